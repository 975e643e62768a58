"""SAM checkpoint key names and shapes, written from the spec (shared by the SAM tests)."""

from __future__ import annotations


def sam_image_encoder_shapes(img_size, patch, width, depth, heads, window, global_blocks, mlp_ratio=4, out=256):
    grid = img_size // patch
    shapes = {
        "image_encoder.pos_embed": (1, grid, grid, width),
        "image_encoder.patch_embed.proj.weight": (width, 3, patch, patch),
        "image_encoder.patch_embed.proj.bias": (width,),
    }
    for i in range(depth):
        b = f"image_encoder.blocks.{i}."
        size = grid if i in global_blocks else window
        shapes.update({
            b + "norm1.weight": (width,), b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "attn.rel_pos_h": (2 * size - 1, width // heads), b + "attn.rel_pos_w": (2 * size - 1, width // heads),
            b + "norm2.weight": (width,), b + "norm2.bias": (width,),
            b + "mlp.lin1.weight": (mlp_ratio * width, width), b + "mlp.lin1.bias": (mlp_ratio * width,),
            b + "mlp.lin2.weight": (width, mlp_ratio * width), b + "mlp.lin2.bias": (width,),
        })
    shapes.update({
        "image_encoder.neck.0.weight": (out, width, 1, 1),
        "image_encoder.neck.1.weight": (out,), "image_encoder.neck.1.bias": (out,),
        "image_encoder.neck.2.weight": (out, out, 3, 3),
        "image_encoder.neck.3.weight": (out,), "image_encoder.neck.3.bias": (out,),
    })
    return shapes


def sam_prompt_encoder_shapes():
    p = "prompt_encoder."
    shapes = {p + "pe_layer.positional_encoding_gaussian_matrix": (2, 128)}
    for i in range(4):
        shapes[p + f"point_embeddings.{i}.weight"] = (1, 256)
    shapes[p + "not_a_point_embed.weight"] = (1, 256)
    shapes[p + "no_mask_embed.weight"] = (1, 256)
    shapes.update({
        p + "mask_downscaling.0.weight": (4, 1, 2, 2), p + "mask_downscaling.0.bias": (4,),
        p + "mask_downscaling.1.weight": (4,), p + "mask_downscaling.1.bias": (4,),
        p + "mask_downscaling.3.weight": (16, 4, 2, 2), p + "mask_downscaling.3.bias": (16,),
        p + "mask_downscaling.4.weight": (16,), p + "mask_downscaling.4.bias": (16,),
        p + "mask_downscaling.6.weight": (256, 16, 1, 1), p + "mask_downscaling.6.bias": (256,),
    })
    return shapes


def sam_mask_decoder_shapes():
    m = "mask_decoder."
    shapes = {}

    def attention(prefix, internal):
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{prefix}{name}.weight"] = (internal, 256)
            shapes[f"{prefix}{name}.bias"] = (internal,)
        shapes[prefix + "out_proj.weight"] = (256, internal)
        shapes[prefix + "out_proj.bias"] = (256,)

    for i in range(2):
        layer = f"{m}transformer.layers.{i}."
        attention(layer + "self_attn.", 256)
        attention(layer + "cross_attn_token_to_image.", 128)
        attention(layer + "cross_attn_image_to_token.", 128)
        for n in range(1, 5):
            shapes[f"{layer}norm{n}.weight"] = (256,)
            shapes[f"{layer}norm{n}.bias"] = (256,)
        shapes.update({
            layer + "mlp.lin1.weight": (2048, 256), layer + "mlp.lin1.bias": (2048,),
            layer + "mlp.lin2.weight": (256, 2048), layer + "mlp.lin2.bias": (256,),
        })
    attention(m + "transformer.final_attn_token_to_image.", 128)
    shapes[m + "transformer.norm_final_attn.weight"] = (256,)
    shapes[m + "transformer.norm_final_attn.bias"] = (256,)
    shapes.update({
        m + "iou_token.weight": (1, 256), m + "mask_tokens.weight": (4, 256),
        m + "output_upscaling.0.weight": (256, 64, 2, 2), m + "output_upscaling.0.bias": (64,),
        m + "output_upscaling.1.weight": (64,), m + "output_upscaling.1.bias": (64,),
        m + "output_upscaling.3.weight": (64, 32, 2, 2), m + "output_upscaling.3.bias": (32,),
    })
    for i in range(4):
        for j, (n_out, n_in) in enumerate([(256, 256), (256, 256), (32, 256)]):
            shapes[f"{m}output_hypernetworks_mlps.{i}.layers.{j}.weight"] = (n_out, n_in)
            shapes[f"{m}output_hypernetworks_mlps.{i}.layers.{j}.bias"] = (n_out,)
    for j, (n_out, n_in) in enumerate([(256, 256), (256, 256), (4, 256)]):
        shapes[f"{m}iou_prediction_head.layers.{j}.weight"] = (n_out, n_in)
        shapes[f"{m}iou_prediction_head.layers.{j}.bias"] = (n_out,)
    return shapes
