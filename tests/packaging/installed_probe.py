"""Checks run INSIDE the clean venv that check_wheel.py installs the built wheel into.

Not a pytest module: check_wheel.py copies it into a temp folder and runs it there with the venv's
``python -I`` (no PYTHONPATH, no user site, not the script's folder on sys.path), so everything below
imports the installed package and reads only the files the wheel shipped. Each check prints one
``PASS name`` or ``FAIL name: why`` line; the exit status is 1 when any failed.

Usage: python -I installed_probe.py SOURCE_ROOT WORK_DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

SOURCE_ROOT = Path(sys.argv[1]).resolve()
WORK_DIR = Path(sys.argv[2]).resolve()
VENV_BIN = Path(sys.executable).parent
results: list[tuple[str, str | None]] = []


def check(name: str):
    """Decorator: run the function now and record PASS, or FAIL with the assertion's message."""

    def run(function):
        try:
            function()
        except Exception as error:  # a failed check is reported, the others still run
            detail = str(error) or type(error).__name__
            if not isinstance(error, AssertionError):
                detail = f"{type(error).__name__}: {detail}\n{traceback.format_exc(limit=4)}"
            results.append((name, detail))
            print(f"FAIL {name}: {detail}", flush=True)
        else:
            results.append((name, None))
            print(f"PASS {name}", flush=True)
        return function

    return run


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _iou(a, b) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


@check("imports the installed package, not the source tree")
def _isolated():
    import linmix

    assert _inside(Path(linmix.__file__), Path(sys.prefix).resolve()), f"linmix imported from {linmix.__file__}, not the venv {sys.prefix}"
    assert not _inside(Path(linmix.__file__), SOURCE_ROOT), f"linmix imported from the source tree: {linmix.__file__}"
    leaked = [p for p in sys.path if p and _inside(Path(p), SOURCE_ROOT)]
    assert not leaked, f"source-tree folders on sys.path: {leaked}"


@check("installed version matches the package metadata")
def _version():
    from importlib.metadata import version

    import linmix

    assert version("linmix") == linmix.__version__, f"metadata {version('linmix')} != linmix.__version__ {linmix.__version__}"


@check("`linmix --version` prints the installed version")
def _cli_version():
    from importlib.metadata import version

    result = subprocess.run([str(VENV_BIN / "linmix"), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr.strip()[-800:]}"
    assert result.stdout.strip() == f"linmix {version('linmix')}", f"printed {result.stdout.strip()!r}"


@check("native CPU kernels build from the installed sources into a fresh cache")
def _native_builds():
    from linmix.ops import native

    cache = native.cache_dir()
    assert _inside(cache, WORK_DIR), f"kernel cache {cache} is not the fresh one under {WORK_DIR} (LINMIX_CACHE_DIR unset?)"
    assert native.available(), f"native kernels unavailable in the installed package: {native.unavailable_reason()}"
    assert _inside(Path(native.library_path()), cache), f"loaded {native.library_path()}, not a library built into {cache}"


@check("native kernels equal the torch reference on the installed package")
def _native_values():
    import torch

    from linmix.ops import native
    from linmix.ops.wkv import bi_wkv_reference
    from linmix.sam.backbone import q_shift

    generator = torch.Generator().manual_seed(0)
    height, width, channels = 5, 7, 24
    x = torch.randn(2, height * width, channels, generator=generator)
    mixes = torch.rand(3, channels, generator=generator)
    shifted = native.q_shift_lerp_native(x, height, width, mixes)
    expected = torch.stack([torch.lerp(q_shift(x, height, width), x, mix) for mix in mixes])
    torch.testing.assert_close(shifted, expected, rtol=1e-6, atol=1e-6)

    w, u = torch.rand(channels, generator=generator) * 0.5, torch.randn(channels, generator=generator)
    k, v = torch.randn(2, 9, channels, generator=generator), torch.randn(2, 9, channels, generator=generator)
    torch.testing.assert_close(native.bi_wkv_native(w, u, k, v), bi_wkv_reference(w, u, k, v), rtol=1e-5, atol=1e-5)

    hidden = torch.randn(4, channels, generator=generator)
    torch.testing.assert_close(native.relu_square_(hidden.clone()), torch.relu(hidden) ** 2, rtol=1e-6, atol=1e-6)
    gate = torch.randn(4, channels, generator=generator)
    torch.testing.assert_close(native.sigmoid_mul_(hidden.clone(), gate), torch.sigmoid(gate) * hidden, rtol=1e-6, atol=1e-6)


@check("bundled example images are the images render_example draws")
def _examples():
    import numpy as np

    from linmix.data.examples import EXAMPLES, example_path, load_example_image, render_example

    assert len(EXAMPLES) >= 1, "no bundled examples"
    for example in EXAMPLES:
        assert example_path(example.name).is_file(), f"missing {example_path(example.name)}"
        shipped = load_example_image(example.name)
        drawn, _ = render_example(example.name)
        assert shipped.shape == drawn.shape, f"{example.name}: shipped {shipped.shape}, drawn {drawn.shape}"
        difference = np.abs(shipped.astype(np.int16) - drawn.astype(np.int16)).max()
        assert difference <= 1, f"{example.name}: shipped PNG differs from the drawing by up to {difference}"


@check("web demo page ships (read as the server reads it)")
def _web_page():
    from importlib.util import find_spec

    # linmix.serve itself imports fastapi (the `serve` extra, not installed here): find its folder
    # without importing it; the server reads static/index.html from that folder.
    (folder,) = find_spec("linmix.serve").submodule_search_locations
    page = Path(folder) / "static" / "index.html"
    assert _inside(page, Path(sys.prefix).resolve()), f"linmix.serve found at {folder}, not in the venv"
    assert page.is_file(), f"{page} is missing"
    text = page.read_text(encoding="utf-8")
    assert "<html" in text.lower() and "/api/" in text, "static/index.html is not the demo page (no <html> or /api/ calls)"


def _box_example():
    from linmix.data.examples import EXAMPLES

    for example in EXAMPLES:
        for prompt in example.prompts:
            if prompt.box is not None:
                return example, prompt
    raise AssertionError("no bundled example has a box prompt")


@check("shipped model segments a bundled example with the native kernels (equal to the torch path)")
def _predictor():
    import numpy as np
    import torch

    from linmix.data.examples import load_example_image, render_example
    from linmix.ops import native
    from linmix.sam import load_default
    from linmix.sam.model import default_checkpoint_path
    from linmix.sam.predictor import RwkvSamPredictor

    assert _inside(default_checkpoint_path(), Path(sys.prefix).resolve()), f"weights path {default_checkpoint_path()} is not in the venv"
    example, prompt = _box_example()
    image, truth = load_example_image(example.name), render_example(example.name)[1][prompt.target]
    predictor = RwkvSamPredictor(load_default())

    calls = {name: 0 for name in ("q_shift_lerp_native", "bi_wkv_native", "relu_square_", "sigmoid_mul_")}
    originals = {name: getattr(native, name) for name in calls}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    for name in calls:
        setattr(native, name, counting(name))
    try:
        predictor.set_image(image)
        masks, scores, low_res_native = predictor.predict(box=np.array(prompt.box), multimask_output=False)
    finally:
        for name, function in originals.items():
            setattr(native, name, function)
    unused = [name for name, count in calls.items() if count == 0]
    assert not unused, f"the image encoder never called native.{unused} (calls: {calls})"

    iou = _iou(masks[0], truth)
    assert iou >= 0.6, f"box prompt on {example.name}/{prompt.target}: IoU {iou:.3f} with the true mask (expected >= 0.6)"

    os.environ["LINMIX_FORCE_REFERENCE"] = "1"  # the same forward on the torch path
    try:
        predictor.set_image(image)
        _, _, low_res_torch = predictor.predict(box=np.array(prompt.box), multimask_output=False)
    finally:
        del os.environ["LINMIX_FORCE_REFERENCE"]
    torch.testing.assert_close(torch.from_numpy(low_res_native), torch.from_numpy(low_res_torch), rtol=1e-3, atol=1e-3)


@check("`linmix sam segment` writes a mask of the boxed object")
def _cli_segment():
    import numpy as np
    from PIL import Image

    from linmix.data.examples import example_path, render_example

    example, prompt = _box_example()
    out = WORK_DIR / "segment-out"
    box = ",".join(str(int(c)) for c in prompt.box)
    command = [str(VENV_BIN / "linmix"), "sam", "segment", str(example_path(example.name)), "--box", box, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-800:]}"
    mask_file = out / f"{example.name}.mask.png"
    assert mask_file.is_file() and mask_file.stat().st_size > 0, f"no mask written at {mask_file}"
    mask = np.array(Image.open(mask_file)) > 127
    truth = render_example(example.name)[1][prompt.target]
    assert mask.shape == truth.shape, f"mask {mask.shape} vs image {truth.shape}"
    iou = _iou(mask, truth)
    assert iou >= 0.6, f"segment mask IoU {iou:.3f} with the true {prompt.target} (expected >= 0.6)"
    scores = json.loads((out / f"{example.name}.scores.json").read_text())
    assert scores["box"] == [float(c) for c in box.split(",")], f"scores.json box {scores['box']}"


failed = [name for name, detail in results if detail is not None]
print(json.dumps({"passed": len(results) - len(failed), "failed": len(failed)}), flush=True)
sys.exit(1 if failed else 0)
