"""RWKV-SAM data: each benchmark layout on a tiny fixture written in that exact layout, bad files
named by path, the procedural generator, prompt sampling, augmentation and the batch source."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from linmix.sam.automatic_mask_generator import counts_to_coco_rle_string, mask_to_rle
from linmix.sam.data import (
    CocoInstancesDataset,
    DatasetError,
    ImageMaskFolderDataset,
    PromptBatchSource,
    ProceduralHQDataset,
    SA1BDataset,
    SegmentationSample,
    augment_sample,
    default_box_noise_cap,
    load_dataset,
    load_hq_dataset,
    prepare_image,
    sample_box_prompt,
    sample_point_prompt,
    tight_box,
)


def random_image(rng, height, width):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def ellipse_mask(height, width, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    return ((yy - cy) / (0.25 * height)) ** 2 + ((xx - cx) / (0.3 * width)) ** 2 <= 1


def write_folder_dataset(root, image_folder, mask_folder, sizes, image_ext=".png"):
    (root / image_folder).mkdir(parents=True)
    (root / mask_folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for i, (height, width) in enumerate(sizes):
        image, mask = random_image(rng, height, width), ellipse_mask(height, width, i)
        Image.fromarray(image).save(root / image_folder / f"img{i}{image_ext}")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / mask_folder / f"img{i}.png")
        expected[f"img{i}"] = (image, mask)
    return expected


@pytest.mark.parametrize(
    "kind, image_folder, mask_folder",
    [("dis5k", "im", "gt"), ("thinobject5k", "images_test", "masks_test"), ("coift", "images", "masks"),
     ("hrsod", "images", "masks_max255"), ("hrsod", "images", "masks")],
)
def test_hq_benchmark_layouts(tmp_path, kind, image_folder, mask_folder):
    expected = write_folder_dataset(tmp_path, image_folder, mask_folder, [(20, 30), (24, 16)])
    dataset = load_hq_dataset(kind, tmp_path)
    dataset.validate()
    assert len(dataset) == 2
    for sample in (dataset[0], dataset[1]):
        image, mask = expected[sample.name]
        assert np.array_equal(sample.image, image)  # PNG: lossless
        assert sample.masks.shape == (1, *mask.shape) and np.array_equal(sample.masks[0], mask)


def test_jpeg_images_and_load_dataset_spec(tmp_path):
    write_folder_dataset(tmp_path / "DIS-VD", "im", "gt", [(32, 40)], image_ext=".jpg")
    dataset = load_dataset(f"dis5k:{tmp_path / 'DIS-VD'}")
    sample = dataset[0]
    assert sample.image.shape == (32, 40, 3) and sample.image.dtype == np.uint8
    with pytest.raises(FileNotFoundError, match="im/ \\+ gt/"):
        load_hq_dataset("dis5k", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_hq_dataset("imagenet", tmp_path)


def test_corrupt_image_and_size_mismatch_are_named(tmp_path):
    write_folder_dataset(tmp_path, "im", "gt", [(20, 30), (20, 30), (20, 30)])
    (tmp_path / "im" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(tmp_path / "gt" / "img2.png")
    dataset = ImageMaskFolderDataset(tmp_path / "im", tmp_path / "gt")
    with pytest.raises(DatasetError) as error:
        dataset.validate()
    message = str(error.value)
    assert "2 bad item(s)" in message
    assert str(tmp_path / "im" / "img1.png") in message
    assert str(tmp_path / "gt" / "img2.png") in message and "(21, 30)" in message
    with pytest.raises(DatasetError, match="img1.png"):
        dataset[1]
    assert dataset[0].masks.shape == (1, 20, 30)


def test_unpaired_files_are_reported(tmp_path):
    write_folder_dataset(tmp_path, "im", "gt", [(8, 8)])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "im" / "lonely.png")
    with pytest.raises(DatasetError, match="lonely"):
        ImageMaskFolderDataset(tmp_path / "im", tmp_path / "gt")


def test_sa1b_json_with_compressed_rle(tmp_path):
    rng = np.random.default_rng(1)
    image = random_image(rng, 24, 32)
    masks = [ellipse_mask(24, 32, 3), ellipse_mask(24, 32, 4) & ~ellipse_mask(24, 32, 3)]
    Image.fromarray(image).save(tmp_path / "sa_1.jpg", quality=95)
    annotations = []
    for i, mask in enumerate(masks):
        rle = mask_to_rle(mask)[0]
        annotations.append({"id": i, "segmentation": {"size": [24, 32], "counts": counts_to_coco_rle_string(rle["counts"])},
                            "area": int(mask.sum()), "bbox": [0, 0, 1, 1]})
    (tmp_path / "sa_1.json").write_text(json.dumps({"image": {"image_id": 1, "height": 24, "width": 32, "file_name": "sa_1.jpg"},
                                                    "annotations": annotations}))
    dataset = SA1BDataset(tmp_path)
    dataset.validate()
    sample = dataset[0]
    assert sample.masks.shape == (2, 24, 32)
    assert all(np.array_equal(a, b) for a, b in zip(sample.masks, masks))
    (tmp_path / "sa_1.json").write_text(json.dumps({"image": {"height": 25, "width": 32}, "annotations": annotations}))
    with pytest.raises(DatasetError, match="sa_1"):
        SA1BDataset(tmp_path).validate()


def test_coco_polygons_rle_and_crowd(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    rle_mask = ellipse_mask(10, 12, 5)
    data = {
        "images": [{"id": 7, "file_name": "a.png", "height": 10, "width": 12},
                   {"id": 8, "file_name": "unannotated.png", "height": 10, "width": 12}],
        "annotations": [
            {"id": 1, "image_id": 7, "iscrowd": 0, "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
            {"id": 2, "image_id": 7, "iscrowd": 0, "segmentation": mask_to_rle(rle_mask)[0]},
            {"id": 3, "image_id": 7, "iscrowd": 1, "segmentation": mask_to_rle(~rle_mask)[0]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    dataset = CocoInstancesDataset(tmp_path / "instances.json", tmp_path / "images")
    assert len(dataset) == 1  # the image without annotations is left out
    sample = dataset[0]
    polygon = np.zeros((10, 12), bool)
    polygon[1:4, 1:5] = True  # PIL fills the polygon's outline pixels too: x 1..4, y 1..3
    assert sample.masks.shape == (2, 10, 12)
    assert np.array_equal(sample.masks[0], polygon)
    assert np.array_equal(sample.masks[1], rle_mask)
    assert len(CocoInstancesDataset(tmp_path / "instances.json", tmp_path / "images", include_crowd=True)[0].masks) == 3


def test_procedural_is_seeded_and_exact():
    dataset = ProceduralHQDataset(seed=3, min_side=128, max_side=192)
    a, b = dataset[5], dataset[5]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    other = ProceduralHQDataset(seed=4, min_side=128, max_side=192)[5]
    assert not (a.image.shape == other.image.shape and np.array_equal(a.image, other.image))
    sizes = set()
    for index in range(12):
        sample = dataset[index]
        height, width = sample.image.shape[:2]
        sizes.add((height, width))
        assert 128 <= height <= 192 and 128 <= width <= 192 and height % 16 == 0 and width % 16 == 0
        assert sample.masks.dtype == bool and sample.masks.shape[1:] == (height, width)
        assert all(mask.any() for mask in sample.masks)
        # Objects occlude each other: no pixel belongs to two masks.
        assert sample.masks.sum(0).max() <= 1
    assert len(sizes) > 3  # several resolutions


def test_procedural_object_count_option_and_default_split_unchanged():
    # The held-out split (procedural:1) must not move when options are added: shapes and object
    # counts of its first items, recorded before the objects= option existed.
    held_out = load_dataset("procedural:1:100")
    assert held_out.name == "procedural:seed1" and len(held_out) == 100
    expected = [((304, 240), 3), ((288, 432), 3), ((432, 304), 2), ((192, 448), 2),
                ((384, 448), 2), ((352, 336), 3), ((352, 448), 2), ((208, 432), 1)]
    assert [(held_out[i].image.shape[:2], len(held_out[i].masks)) for i in range(8)] == expected

    crowded = load_dataset("procedural:1:objects=3-4")
    assert crowded.name == "procedural:seed1:objects=3-4" and len(crowded) == 1_000_000
    counts = [len(crowded[i].masks) for i in range(10)]
    # Objects hidden by later ones (or left too small) are dropped, so a few images keep fewer.
    assert max(counts) <= 4 and sum(c >= 3 for c in counts) >= 7
    exactly_two = load_dataset("procedural:2:5:objects=2")
    assert (exactly_two.min_objects, exactly_two.max_objects, len(exactly_two)) == (2, 2, 5)
    assert 1 <= len(exactly_two[0].masks) <= 2
    for bad in ("procedural:1:objects=3-2", "procedural:1:objects=0-2", "procedural:1:objects=two", "procedural:1:5:6"):
        with pytest.raises(ValueError, match="procedural"):
            load_dataset(bad)
    with pytest.raises(ValueError, match="min_objects"):
        ProceduralHQDataset(min_objects=4, max_objects=3)


def test_procedural_thin_structures_and_holes():
    dataset = ProceduralHQDataset(seed=0)
    rng = np.random.default_rng(0)
    wire = dataset._wire(rng, 256, 256) <= 0
    # A wire is at most ~2 * 4 * 256/384 = 5.3 px thick: a 3-pixel erosion (7 x 7 square) removes it.
    from linmix.sam.metrics import erode

    assert wire.any() and not erode(wire, 3).any()
    blob = dataset._blob(np.random.default_rng(1), 256, 256) <= 0
    # Holes: background pixels enclosed by the blob's box that the blob surrounds.
    ys, xs = np.nonzero(blob)
    inside_box = ~blob[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    centre_row = blob[(ys.min() + ys.max()) // 2]
    assert inside_box.any() and centre_row.any()


def test_box_and_point_prompts():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:30] = True
    assert tight_box(mask).tolist() == [5, 10, 29, 19]
    rng = np.random.default_rng(0)
    for _ in range(50):
        box = sample_box_prompt(mask, rng)
        assert box[0] <= box[2] and box[1] <= box[3]
        assert np.all(np.abs(box - tight_box(mask)) <= 20 + 1e-6)
        assert 0 <= box[0] and box[2] <= 49 and 0 <= box[1] and box[3] <= 39
        coords, labels = sample_point_prompt(mask, rng, negative_probability=0.5)
        positive, negative = coords[labels == 1].astype(int), coords[labels == 0].astype(int)
        assert 1 <= len(positive) <= 5 and len(negative) <= 2
        assert mask[positive[:, 1], positive[:, 0]].all()
        assert not mask[negative[:, 1], negative[:, 0]].any()


def test_augment_resize_flip_and_pad():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40] = 200
    mask = np.zeros((1, 40, 80), bool)
    mask[0, 10:30, 0:20] = True
    sample = SegmentationSample(image, mask, "x")
    rng = np.random.default_rng(0)
    frame_image, frame_masks = augment_sample(sample, rng, frame=64, scale_range=(1.0, 1.0), flip_probability=0.0)
    assert frame_image.shape == (3, 64, 64) and frame_masks.shape == (1, 64, 64)
    # 80 -> 64: scale 0.8, so the 20 x 20 square becomes 16 x 16 at rows 8..23, columns 0..15.
    assert (frame_masks[0] > 0.5).sum() == 16 * 16
    assert frame_masks[0, 8:24, 0:16].min() > 0.5
    assert torch.all(frame_image[:, 32:] == 0) and torch.all(frame_masks[:, 32:] == 0)  # padding
    flipped_image, flipped = augment_sample(sample, rng, frame=64, scale_range=(1.0, 1.0), flip_probability=1.0)
    assert torch.equal(flipped[0, :, 48:64].flip(-1), frame_masks[0, :, 0:16])
    expected = prepare_image(torch.full((3, 1, 1), 200.0), 1)[:, 0, 0]
    assert torch.allclose(flipped_image[:, 0, 63], expected)
    # Large-scale jitter: scaled up 2x the frame is cropped, objects that leave the crop are dropped.
    for seed in range(5):
        _, jittered = augment_sample(sample, np.random.default_rng(seed), frame=64, scale_range=(2.0, 2.0))
        assert jittered.shape[0] == 1 and (jittered[0] > 0.5).sum() >= 16


def test_batch_source_is_a_pure_function_of_its_indices():
    source = PromptBatchSource(ProceduralHQDataset(seed=0, min_side=96, max_side=128), batch_size=2, image_size=64,
                               prompts_per_image=2, grad_accum=2, seed=1)
    a, b = source.get(3, 1, 0, 2), source.get(3, 1, 0, 2)
    assert all(torch.equal(a[key], b[key]) for key in a)
    c = source.get(3, 1, 1, 2)
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].shape == (2, 3, 64, 64) and a["masks"].shape == (2, 2, 64, 64)
    assert a["boxes"].shape == (2, 2, 4) and a["point_coords"].shape == (2, 2, 7, 2)
    assert a["is_box"].tolist() == [True, False]
    # Point prompts: at least one positive point per prompt, inside the target mask.
    labels, coords = a["point_labels"][1], a["point_coords"][1].long()
    for k in range(2):
        positive = coords[k][labels[k] == 1]
        assert len(positive) >= 1
        assert (a["masks"][1, k][positive[:, 1], positive[:, 0]] > 0.5).all()


def _box_edge_moves(source, steps):
    moves = []
    for step in range(steps):
        batch = source.get(step, 0, 0, 1)
        for image in range(batch["images"].shape[0]):
            if not batch["is_box"][image]:
                continue
            for k in range(batch["masks"].shape[1]):
                truth = tight_box((batch["masks"][image, k] > 0.5).numpy())
                moves.append(np.abs(batch["boxes"][image, k].numpy() - truth))
    return np.concatenate(moves)


def test_box_noise_cap_scales_with_the_frame_like_sams_20_px_at_1024():
    assert default_box_noise_cap(1024) == 20.0 and default_box_noise_cap(256) == 5.0
    dataset = ProceduralHQDataset(seed=3, min_side=192, max_side=256)
    scaled = PromptBatchSource(dataset, batch_size=4, image_size=256, prompts_per_image=2, seed=0)
    wide = PromptBatchSource(dataset, batch_size=4, image_size=256, prompts_per_image=2, seed=0, box_noise_cap=20)
    tight = PromptBatchSource(dataset, batch_size=4, image_size=256, prompts_per_image=2, seed=0, box_noise=0.0)
    scaled_moves, wide_moves = _box_edge_moves(scaled, 4), _box_edge_moves(wide, 4)
    assert scaled.box_noise_cap == 5.0 and scaled_moves.max() <= 5 + 1e-4
    assert wide_moves.max() > 5 and wide_moves.max() <= 20 + 1e-4  # objects of 100+ px move by more than 5
    assert _box_edge_moves(tight, 4).max() < 1e-4
    with pytest.raises(ValueError, match="box_noise"):
        PromptBatchSource(dataset, batch_size=1, image_size=64, box_noise=-0.1)


def test_finite_dataset_epochs_visit_every_item(tmp_path):
    write_folder_dataset(tmp_path, "im", "gt", [(16, 16)] * 3)
    source = PromptBatchSource(load_hq_dataset("dis5k", tmp_path), batch_size=1, image_size=32, seed=0, augment=False)
    names = [source._item(position).name for position in range(6)]
    assert sorted(names[:3]) == sorted(names[3:]) == ["img0", "img1", "img2"]


def test_generated_datasets_are_read_by_position_file_datasets_shuffled(tmp_path):
    class Generated:  # any dataset that says its items are independent draws (the procedural and copy-paste kinds)
        is_generated = True

        def __len__(self):
            return 7

        def __getitem__(self, index):
            return index

    generated = PromptBatchSource(Generated(), batch_size=1, image_size=32)
    assert [generated._item(p) for p in range(10)] == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert ProceduralHQDataset.is_generated
    write_folder_dataset(tmp_path, "im", "gt", [(16, 16)] * 7)
    files = PromptBatchSource(load_hq_dataset("dis5k", tmp_path), batch_size=1, image_size=32, seed=0)
    assert [files._item(p).name for p in range(7)] != [f"img{i}" for i in range(7)]  # a seeded shuffle per epoch


def test_every_old_import_path_still_works():
    import linmix.sam.data as data
    from linmix.sam.data import formats, procedural, prompts, sources

    moved = {
        formats: ["HQ_DATASET_LAYOUTS", "IMAGE_EXTENSIONS", "CocoInstancesDataset", "DatasetError", "ImageMaskFolderDataset",
                  "SA1BDataset", "SegmentationSample", "load_hq_dataset", "read_mask", "read_rgb"],
        procedural: ["ProceduralHQDataset"],
        prompts: ["PIXEL_MEAN", "PIXEL_STD", "augment_sample", "default_box_noise_cap", "prepare_image", "sample_box_prompt",
                  "sample_point_prompt", "tight_box", "_resize"],
        sources: ["PromptBatchSource", "TeacherFeatureBatchSource"],
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(data, name) is getattr(module, name), name
            assert name.startswith("_") or name in data.__all__, name
    assert "load_dataset" in data.__all__


def test_dataset_kinds_table_is_the_spec_parser(monkeypatch, tmp_path):
    from linmix.sam.data import DATASET_KINDS, DatasetKind

    built = []
    monkeypatch.setitem(DATASET_KINDS, "copypaste", DatasetKind("copypaste:SEED[:LENGTH]", lambda arguments, spec: built.append((arguments, spec)) or "made"))
    assert load_dataset("copypaste:7:50") == "made" and built == [("7:50", "copypaste:7:50")]
    assert load_dataset("Copy-Paste:8") == "made"  # kinds match ignoring case, "-" and "_"
    with pytest.raises(ValueError, match="unknown dataset kind 'imagenet'") as error:
        load_dataset("imagenet:/data")
    assert "copypaste:SEED[:LENGTH]" in str(error.value) and "procedural:SEED[:LENGTH][:objects=MIN-MAX]" in str(error.value)
    with pytest.raises(ValueError, match="must be KIND:PATH"):
        load_dataset("procedural")
    with pytest.raises(ValueError, match="coco:FIRST_PATH:SECOND_PATH"):
        load_dataset("coco:only_one_path.json")
    write_folder_dataset(tmp_path / "DIS-VD", "im", "gt", [(8, 8)])
    assert load_dataset(f"DIS5K:{tmp_path / 'DIS-VD'}").name == "dis5k:DIS-VD"


def test_sideways_camera_image_loads_upright_beside_its_mask(tmp_path):
    # A JPEG-less check of the dataset path: the image stored sideways with EXIF orientation 6, its mask
    # drawn upright (as annotation tools show the image); the sample pairs them pixel for pixel.
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    upright = random_image(np.random.default_rng(3), 24, 16)
    mask = ellipse_mask(24, 16, 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(np.rot90(upright, 1).copy()).save(tmp_path / "im" / "phone.png", exif=exif.tobytes())
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "gt" / "phone.png")
    dataset = ImageMaskFolderDataset(tmp_path / "im", tmp_path / "gt")
    dataset.validate()
    sample = dataset[0]
    np.testing.assert_array_equal(sample.image, upright)
    np.testing.assert_array_equal(sample.masks[0], mask)


@pytest.mark.parametrize("foreground", [255, 65535])
def test_sixteen_bit_masks_read_as_meant(tmp_path, foreground):
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    mask = ellipse_mask(12, 10, 2)
    Image.fromarray(random_image(np.random.default_rng(0), 12, 10)).save(tmp_path / "im" / "a.png")
    Image.fromarray((mask * foreground).astype(np.uint16)).save(tmp_path / "gt" / "a.png")
    np.testing.assert_array_equal(ImageMaskFolderDataset(tmp_path / "im", tmp_path / "gt")[0].masks[0], mask)
