"""Copy-paste data: exact visible masks, determinism, disjoint splits, spec parsing and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import linmix.sam.data.copypaste as copypaste
from linmix.sam.data.copypaste import CopyPasteDataset, Placement, compose_cutouts, from_spec, source_key, split_of
from linmix.sam.data import DatasetError, ProceduralHQDataset, PromptBatchSource

COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (200, 40, 200), (20, 210, 210), (250, 140, 0), (120, 70, 20)]


def _disc_cutout(colour, size: int, hole: bool = False) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    r = np.hypot(xx - size / 2, yy - size / 2)
    alpha = np.where(r <= size * 0.45, 255, 0)
    if hole:
        alpha = np.where(r <= size * 0.15, 0, alpha)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = alpha
    return rgba


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("copypaste")
    rng = np.random.default_rng(0)
    backgrounds = root / "photos"
    for i in range(8):
        folder = backgrounds / ("nature" if i % 2 else "city")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.uniform(0, 255, size=(60 + 4 * i, 80, 3))).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.{'jpg' if i % 2 else 'png'}")
    objects = root / "cutouts"
    objects.mkdir()
    for i, colour in enumerate(COLOURS):
        Image.fromarray(_disc_cutout(colour, 40, hole=i % 3 == 0), "RGBA").save(objects / f"thing{i}.png")
    Image.fromarray(np.full((20, 20, 3), 128, dtype=np.uint8)).save(objects / "no_alpha.png")  # skipped
    opaque = root / "opaque"
    opaque.mkdir()
    Image.fromarray(np.full((20, 20, 3), 128, dtype=np.uint8)).save(opaque / "flat.jpg")
    empty = root / "empty"
    empty.mkdir()
    return {"backgrounds": backgrounds, "objects": objects, "opaque": opaque, "empty": empty}


def _dataset(sources, **kwargs) -> CopyPasteDataset:
    options = dict(backgrounds=sources["backgrounds"], objects=sources["objects"], emoji="none",
                   min_side=64, max_side=96, heldout_every=2)
    seed = kwargs.pop("seed", 0)
    options.update(kwargs)
    return CopyPasteDataset(seed, 20, **options)


# -- compositing with known geometry ------------------------------------------------------------


def _square(colour, size, alpha=255):
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = alpha
    return rgba


def test_compose_masks_are_the_visible_alpha_after_occlusion():
    background = np.full((40, 40, 3), 10, dtype=np.uint8)
    red = Placement(_square((255, 0, 0), 10), top=5, left=5)
    green = Placement(_square((0, 255, 0), 10), top=10, left=10)  # covers red's lower-right quarter
    image, masks = compose_cutouts(background, [red, green], min_visible=0.3, min_area=4)
    expected_green = np.zeros((40, 40), dtype=bool)
    expected_green[10:20, 10:20] = True
    expected_red = np.zeros((40, 40), dtype=bool)
    expected_red[5:15, 5:15] = True
    expected_red &= ~expected_green
    assert masks.shape == (2, 40, 40)
    np.testing.assert_array_equal(masks[0], expected_red)
    np.testing.assert_array_equal(masks[1], expected_green)
    assert red.visible_fraction == pytest.approx(0.75) and green.visible_fraction == 1.0
    assert (image[expected_red] == [255, 0, 0]).all() and (image[expected_green] == [0, 255, 0]).all()
    assert (image[~(expected_red | expected_green)] == 10).all()


def test_compose_drops_hidden_objects_and_clips_at_the_border():
    background = np.zeros((30, 30, 3), dtype=np.uint8)
    hidden = Placement(_square((255, 0, 0), 4), top=20, left=20)
    mostly_hidden = Placement(_square((0, 0, 255), 10), top=0, left=0)  # 80 of 100 px covered below
    cover = Placement(_square((0, 255, 0), 12), top=20, left=20)  # hangs over the border: 10x10 on the canvas
    cover_mostly = Placement(_square((9, 9, 9), 10), top=0, left=2)
    edge = Placement(_square((200, 200, 0), 10), top=25, left=-5)  # 5x5 of it on the canvas
    image, masks = compose_cutouts(background, [hidden, mostly_hidden, cover, cover_mostly, edge], min_visible=0.3, min_area=4)
    assert not hidden.kept and hidden.visible_fraction == 0.0
    assert not mostly_hidden.kept and mostly_hidden.visible_fraction == pytest.approx(0.2)
    assert cover.kept and cover_mostly.kept and edge.kept
    assert masks.shape[0] == 3
    assert int(edge.full.sum()) == 25 and edge.visible_fraction == 1.0
    assert int(cover.full.sum()) == int(cover.visible.sum()) == 100


def test_compose_half_transparent_cutout_blends_and_is_not_in_a_mask():
    background = np.full((20, 20, 3), 100, dtype=np.uint8)
    solid = Placement(_square((200, 0, 0), 10), top=0, left=0)
    glass = Placement(_square((0, 0, 255), 10, alpha=102), top=0, left=0)  # alpha 0.4 < 0.5: not an object
    image, masks = compose_cutouts(background, [solid, glass], min_visible=0.3, min_area=4)
    assert masks.shape[0] == 1 and int(masks[0].sum()) == 100  # the red square shows through
    np.testing.assert_array_equal(image[0, 0], np.round(np.array([200, 0, 0]) * 0.6 + np.array([0, 0, 255]) * 0.4).astype(np.uint8))


def test_compose_shadow_darkens_only_outside_the_mask():
    background = np.full((40, 40, 3), 200, dtype=np.uint8)
    item = Placement(_square((0, 0, 0), 10), top=10, left=10, shadow=(3, 3, 2.0, 0.5))
    image, masks = compose_cutouts(background, [item])
    assert int(masks[0].sum()) == 100  # the shadow is not part of the object
    assert image[22, 22].max() < 200 and image[0, 0].max() == 200


# -- the dataset ----------------------------------------------------------------------------------


def test_dataset_masks_equal_the_recomputed_visible_alpha(sources):
    dataset = _dataset(sources, augment=False, min_objects=2, max_objects=5)
    for index in range(6):
        sample, placements = dataset.generate(index)
        height, width = sample.image.shape[:2]
        fulls = []
        for p in placements:  # recompute each object's canvas alpha from the paste record
            full = np.zeros((height, width), dtype=bool)
            alpha = np.zeros((height, width), dtype=np.uint8)
            rgb = np.zeros((height, width, 3), dtype=np.uint8)
            h, w = p.rgba.shape[:2]
            for y in range(h):
                if 0 <= p.top + y < height:
                    xs = np.arange(w) + p.left
                    inside = (xs >= 0) & (xs < width)
                    full[p.top + y, xs[inside]] = p.rgba[y, inside, 3] > 127
                    alpha[p.top + y, xs[inside]] = p.rgba[y, inside, 3]
                    rgb[p.top + y, xs[inside]] = p.rgba[y, inside, :3]
            fulls.append((full, alpha, rgb, p))
        expected = []
        for k, (full, alpha, rgb, p) in enumerate(fulls):
            later = np.zeros_like(full)
            for other, _, _, _ in fulls[k + 1 :]:
                later |= other
            visible = full & ~later
            if p.kept:
                expected.append(visible)
                # Opaque pixels of a visible cut-out that nothing covers show exactly its (unjittered) colour.
                opaque = visible & (alpha == 255)
                for _, other_alpha, _, _ in fulls[k + 1 :]:
                    opaque &= other_alpha == 0
                assert opaque.any()
                np.testing.assert_array_equal(sample.image[opaque], rgb[opaque])
            assert p.kept == (visible.sum() >= max(20, int(0.001 * height * width)) and visible.sum() >= 0.3 * full.sum())
        assert len(expected) == sample.masks.shape[0] >= 1
        np.testing.assert_array_equal(sample.masks, np.stack(expected))
        # visible masks of one image are disjoint
        assert int(sample.masks.sum(0).max()) == 1


def test_dataset_is_deterministic_per_seed_and_seeds_differ(sources):
    first, again, other = _dataset(sources, seed=3), _dataset(sources, seed=3), _dataset(sources, seed=4)
    for index in (0, 5):
        a, b, c = first[index], again[index], other[index]
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert not np.array_equal(first[0].image, first[1].image) or first[0].image.shape != first[1].image.shape


def test_splits_share_no_photo_and_no_cutout(sources):
    train, heldout = _dataset(sources, split="train"), _dataset(sources, split="heldout")
    assert train.background_keys and heldout.background_keys and train.object_files and heldout.object_files
    assert not set(train.background_keys) & set(heldout.background_keys)
    assert not set(train.cutout_keys()) & set(heldout.cutout_keys())
    assert len(train.background_keys) + len(heldout.background_keys) == 8
    assert len(train.cutout_keys()) + len(heldout.cutout_keys()) == 8  # no_alpha.png is not a cut-out
    for dataset in (train, heldout):
        for index in range(4):
            _, placements = dataset.generate(index)
            assert {p.key for p in placements} <= set(dataset.cutout_keys())
    assert all(split_of(k, 2) == "heldout" for k in heldout.cutout_keys() + heldout.background_keys)


def test_split_key_ignores_resolution_and_light_dark_variants():
    root = Path("/pics")
    assert source_key("/pics/a/Elephants_3840x2160.jpg", root) == source_key("/pics/a/Elephants.jpg", root) == "a/elephants"
    assert source_key("/pics/blobs-l.webp", root) == source_key("/pics/blobs-d.webp", root) == "blobs"
    # icon themes: one icon at every size and direction is one key
    assert (source_key("/pics/16x16/actions/edit-redo-rtl.png", root) == source_key("/pics/64x64@2x/actions/edit-redo.png", root)
            == source_key("/pics/actions/48/edit-redo.png", root) == "actions/edit-redo")
    assert split_of("a/elephants") == split_of("a/elephants") in ("train", "heldout")
    shares = [split_of(f"file{i}") == "heldout" for i in range(4000)]
    assert 0.10 < np.mean(shares) < 0.15  # about 1 in 8
    with pytest.raises(ValueError, match="heldout_every"):
        split_of("x", 1)


def test_procedural_share_one_gives_the_procedural_items(sources):
    dataset = _dataset(sources, procedural_share=1.0)
    procedural = ProceduralHQDataset(0, 20, min_side=64, max_side=96)
    np.testing.assert_array_equal(dataset[2].image, procedural[2].image)


def test_prompt_batch_source_takes_the_dataset(sources):
    source = PromptBatchSource(_dataset(sources), batch_size=2, image_size=64, prompts_per_image=2)
    batch = source.get(0, 0, 0, 1)
    assert batch["images"].shape == (2, 3, 64, 64) and batch["masks"].shape == (2, 2, 64, 64)
    assert float(batch["masks"].amax(dim=(2, 3)).min()) > 0.5  # every prompted target is visible


# -- spec and errors ------------------------------------------------------------------------------


def test_spec_parsing(sources):
    dataset = from_spec(
        f"3:7:backgrounds={sources['backgrounds']}:objects={sources['objects']}:emoji=none:split=heldout:"
        "per_image=2-3:size=64-96:heldout_every=2:min_visible=0.5:augment=0"
    )
    assert (dataset.seed, dataset.length, dataset.split) == (3, 7, "heldout")
    assert (dataset.min_objects, dataset.max_objects, dataset.min_side, dataset.max_side) == (2, 3, 64, 96)
    assert dataset.min_visible == 0.5 and not dataset.augment and dataset.emoji == [] and dataset.name == "copypaste:seed3:heldout"
    assert 1 <= dataset[0].masks.shape[0] <= 3
    for bad, message in (
        ("", "copypaste:SEED"), ("x", "copypaste:SEED"), ("1:2:3", "copypaste:SEED"),
        (f"1:backgrounds={sources['backgrounds']}:colour=red", "unknown copypaste option 'colour'"),
        (f"1:backgrounds={sources['backgrounds']}:per_image=a-b", "per_image=MIN-MAX"),
        (f"1:backgrounds={sources['backgrounds']}:objects={sources['objects']}:split=test", "split must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            from_spec(bad)


def test_clear_errors_for_missing_empty_and_alpha_less_sources(sources, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="background folder not found: .*nowhere"):
        CopyPasteDataset(backgrounds=tmp_path / "nowhere", objects=sources["objects"])
    with pytest.raises(FileNotFoundError, match="no photographs"):
        CopyPasteDataset(backgrounds=sources["empty"], objects=sources["objects"])
    with pytest.raises(FileNotFoundError, match="objects folder not found"):
        CopyPasteDataset(backgrounds=sources["backgrounds"], objects=tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="no images under the objects"):
        CopyPasteDataset(backgrounds=sources["backgrounds"], objects=sources["empty"])
    with pytest.raises(DatasetError, match="alpha channel"):
        CopyPasteDataset(backgrounds=sources["backgrounds"], objects=sources["opaque"])
    with pytest.raises(FileNotFoundError, match="emoji font not found"):
        CopyPasteDataset(backgrounds=sources["backgrounds"], emoji=tmp_path / "missing.ttf")
    monkeypatch.setattr(copypaste, "DEFAULT_BACKGROUND_DIRS", (str(tmp_path / "no-backgrounds"),))
    monkeypatch.setattr(copypaste, "DEFAULT_EMOJI_FONTS", (str(tmp_path / "no-font.ttf"),))
    with pytest.raises(FileNotFoundError, match="mate-backgrounds.*backgrounds=DIR"):
        CopyPasteDataset(objects=sources["objects"])
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji.*objects=DIR"):
        CopyPasteDataset(backgrounds=sources["backgrounds"])


def test_cutouts_without_a_silhouette_are_skipped(sources, tmp_path):
    objects = tmp_path / "objects"
    objects.mkdir()
    Image.fromarray(_square((10, 10, 10), 30), "RGBA").save(objects / "opaque_square.png")  # alpha everywhere
    Image.fromarray(_square((10, 10, 10), 30, alpha=0), "RGBA").save(objects / "invisible.png")
    dataset = CopyPasteDataset(backgrounds=sources["backgrounds"], objects=objects, emoji="none", split="train", heldout_every=1000)
    with pytest.raises(DatasetError, match="no usable alpha silhouette"):
        dataset[0]


EMOJI_FONT = Path(copypaste.DEFAULT_EMOJI_FONTS[0])


@pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="fonts-noto-color-emoji is not installed")
def test_emoji_glyphs_render_with_exact_alpha_and_split_by_codepoint(sources):
    train = CopyPasteDataset(backgrounds=sources["backgrounds"], emoji=EMOJI_FONT, split="train")
    heldout = CopyPasteDataset(backgrounds=sources["backgrounds"], emoji=EMOJI_FONT, split="heldout", min_side=64, max_side=96)
    assert len(train.emoji) > 500 and len(heldout.emoji) > 50 and not set(train.emoji) & set(heldout.emoji)
    rgba = copypaste._render_emoji(EMOJI_FONT, 0x1F600)  # grinning face: a round yellow disc
    assert rgba.shape[2] == 4 and 80 <= rgba.shape[0] <= 136
    opaque = rgba[..., 3] > 127
    assert 0.6 < opaque.mean() < 0.9  # a disc fills pi/4 of its box
    sample, placements = heldout.generate(0)
    assert all(p.key.startswith("emoji:U+") for p in placements) and sample.masks.shape[0] >= 1


def test_load_dataset_builds_the_copypaste_kind(sources):
    from linmix.sam.data import CopyPasteDataset as exported, load_dataset

    spec = f"copypaste:3:7:backgrounds={sources['backgrounds']}:objects={sources['objects']}:emoji=none:size=64-96"
    dataset = load_dataset(spec)
    direct = from_spec(spec.partition(":")[2])
    assert isinstance(dataset, exported) and len(dataset) == 7 and dataset.is_generated
    for index in (0, 5):
        np.testing.assert_array_equal(dataset[index].image, direct[index].image)
        np.testing.assert_array_equal(dataset[index].masks, direct[index].masks)
