"""End to end: a real uvicorn server, the page in headless Chromium; upload, drag a box, click a point,
and check that the mask overlay is drawn on the canvas; save a screenshot.

Needs Debian's `chromium` (`.ci/run` installs it in CI) and PyPI's playwright (dev extra); without
the browser this test is skipped locally and fails in CI (CI=true), so it cannot silently vanish there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_demo import chromium_path, drive, running_server  # noqa: E402

from linmix.data.examples import example_path  # noqa: E402
from tiny_sam import tiny_sam  # noqa: E402


def _make_the_mask_visible(model, box, point):
    """Random weights may select nothing (or everything) for the test's prompt; then move the model's
    mask threshold to the median logit, so part of the image is selected and the page has a mask to draw."""
    from linmix.data.examples import load_example_image
    from linmix.sam import RwkvSamPredictor

    predictor = RwkvSamPredictor(model)
    predictor.set_image(load_example_image("shapes"))
    logits, _, _ = predictor.predict(point_coords=np.array([point]), point_labels=np.array([1]), box=np.array(box),
                                     multimask_output=False, return_logits=True)
    if not 0.01 < (logits > model.mask_threshold).mean() < 0.99:
        model.mask_threshold = float(np.median(logits))


def _more_prompts(page, to_page):
    from browser_demo import COUNT_MASK_PIXELS_JS

    def prompts():
        return {"points": page.evaluate("() => state.points.length"), "labels": page.evaluate("() => state.labels"),
                "state": page.evaluate("() => document.body.dataset.state")}

    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    seen = {}
    page.locator("#overlay").click(position=to_page(300, 230), button="right")
    page.wait_for_function("() => document.body.dataset.state === 'mask' && state.points.length === 2", timeout=60_000)
    seen["right_click"] = prompts()
    page.click("#undo")
    page.wait_for_function("() => document.body.dataset.state === 'mask' && state.points.length === 1", timeout=60_000)
    seen["undo"] = prompts()
    page.click("#clear")
    seen["clear"] = {"points": page.evaluate("() => state.points.length"), "box": page.evaluate("() => state.box"),
                     "mask_pixels_drawn": page.evaluate(COUNT_MASK_PIXELS_JS)}
    seen["errors"] = errors
    return seen


def test_click_to_segment_in_chromium(tmp_path):
    if chromium_path() is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must install it (.ci/run)")
        pytest.skip(message)
    pytest.importorskip("playwright", reason="playwright (dev extra) is not installed")
    from PIL import Image

    from linmix.serve import create_app

    model = tiny_sam(seed=0)
    _make_the_mask_visible(model, box=(38, 68, 182, 172), point=(110, 120))
    app = create_app(model)
    screenshot = tmp_path / "serve-demo.png"
    with running_server(app) as url:
        # A box on the ellipse, then a foreground click inside it (image pixels of the bundled example),
        # then a right click (background point), Undo, and Clear.
        result = drive(url, example_path("shapes"), screenshot, click=(110, 120), box=(38, 68, 182, 172), then=_more_prompts)
    assert result["errors"] == []
    assert result["box"] == pytest.approx([38, 68, 182, 172], abs=2)
    assert result["points"] == [pytest.approx([110, 120], abs=2)] and result["labels"] == [1]
    assert result["mask_area"] > 0 and "Mask:" in result["status"]
    assert result["mask_pixels_drawn"] > 0, "the mask overlay was not drawn on the canvas"
    assert result["candidates"] == 1  # a box prompt gives one mask
    after = result["then"]
    assert after["right_click"] == {"points": 2, "labels": [1, 0], "state": "mask"}
    assert after["undo"] == {"points": 1, "labels": [1], "state": "mask"}
    assert after["clear"]["points"] == 0 and after["clear"]["box"] is None and after["clear"]["mask_pixels_drawn"] == 0
    assert after["errors"] == []
    with Image.open(screenshot) as shot:
        assert shot.size == (1100, 720)
        pixels = np.asarray(shot.convert("RGB"))
    assert pixels.std() > 10  # not a blank page
