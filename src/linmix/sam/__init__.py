"""RWKV-SAM: conv + Vision-RWKV backbone, SAM prompt encoder and mask decoder with HQ fusion."""

from linmix.sam.automatic_mask_generator import AutomaticMaskGenerator
from linmix.sam.backbone import RwkvSamBackbone, RwkvSamImageEncoder
from linmix.sam.export import export_decoder_onnx, export_image_encoder_onnx
from linmix.sam.mask_decoder import MaskDecoder, TwoWayTransformer
from linmix.sam.model import RwkvSam, build_rwkv_sam, load_default, rwkv_sam_model_registry
from linmix.sam.predictor import RwkvSamPredictor
from linmix.sam.prompt_encoder import PromptEncoder
from linmix.sam.transforms import ResizeLongestSide

__all__ = [
    "AutomaticMaskGenerator",
    "MaskDecoder",
    "PromptEncoder",
    "ResizeLongestSide",
    "RwkvSam",
    "RwkvSamBackbone",
    "RwkvSamImageEncoder",
    "RwkvSamPredictor",
    "TwoWayTransformer",
    "build_rwkv_sam",
    "export_decoder_onnx",
    "export_image_encoder_onnx",
    "load_default",
    "rwkv_sam_model_registry",
]
