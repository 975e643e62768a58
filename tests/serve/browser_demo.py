"""Drive the demo page in headless Chromium (Debian's `chromium`, through Playwright): upload an image,
click a foreground point, drag a box, wait for the mask overlay, take a screenshot.

Used by test_browser.py, and by hand for the README's screenshot (the shipped model, or a checkpoint)::

    .venv/bin/python tests/serve/browser_demo.py --out docs/serve-demo.png
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# The args ENVIRONMENT.md lists for the system browser in a container without a GPU or network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# Counts overlay pixels painted by a mask (the page tints masks with alpha 120; points are opaque).
COUNT_MASK_PIXELS_JS = """() => {
  const canvas = document.getElementById('overlay');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 60 && data[i] < 200) count++;
  return count;
}"""


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(app, port: int | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the uvicorn server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def drive(url: str, image_path: Path, screenshot: Path, *, click: tuple[float, float], box: tuple[float, float, float, float] | None = None,
          then=None, timeout_ms: float = 60_000) -> dict:
    """Upload ``image_path``, click at ``click`` (image pixels), optionally drag ``box``, take the
    screenshot; then ``then(page, to_page)`` may go on (``to_page(x, y)``: image pixels -> overlay
    position). Returns what the page showed after the click, and ``then``'s result under "then"."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.set_input_files("#file", str(image_path))
            page.wait_for_selector("body[data-state=ready]", timeout=timeout_ms)
            overlay = page.locator("#overlay")
            bounds = overlay.bounding_box()
            scale = page.evaluate("() => document.getElementById('overlay').width") / page.evaluate(
                "() => document.getElementById('image-canvas').width"
            )
            image_width = page.evaluate("() => state.width")
            display_scale = bounds["width"] / image_width * scale
            if box is not None:
                x0, y0, x1, y1 = (v * display_scale for v in box)
                page.mouse.move(bounds["x"] + x0, bounds["y"] + y0)
                page.mouse.down()
                page.mouse.move(bounds["x"] + (x0 + x1) / 2, bounds["y"] + (y0 + y1) / 2, steps=4)
                page.mouse.move(bounds["x"] + x1, bounds["y"] + y1, steps=4)
                page.mouse.up()
                page.wait_for_selector("body[data-state=mask]", timeout=timeout_ms)
            overlay.click(position={"x": click[0] * display_scale, "y": click[1] * display_scale})
            page.wait_for_function("() => document.body.dataset.state === 'mask' && state.points.length === 1", timeout=timeout_ms)
            result = {
                "status": page.inner_text("#status"),
                "mask_area": int(page.get_attribute("#status", "data-mask-area")),
                "mask_pixels_drawn": page.evaluate(COUNT_MASK_PIXELS_JS),
                "points": page.evaluate("() => state.points"),
                "labels": page.evaluate("() => state.labels"),
                "box": page.evaluate("() => state.box"),
                "candidates": page.locator("#candidates li").count(),
                "errors": errors,
            }
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=False)
            if then is not None:
                result["then"] = then(page, lambda x, y: {"x": x * display_scale, "y": y * display_scale})
            return result
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/serve-demo.png"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    args = parser.parse_args(argv)
    from linmix.data.examples import example_path
    from linmix.segment import load_sam_model
    from linmix.serve import create_app

    app = create_app(load_sam_model(args.checkpoint))
    with running_server(app) as url:
        result = drive(url, example_path("shapes"), args.out, click=(265, 95))
    from PIL import Image

    with Image.open(args.out) as shot:  # 256 colours: a small PNG for the README
        shot.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(args.out, optimize=True)
    print(result, file=sys.stderr)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
