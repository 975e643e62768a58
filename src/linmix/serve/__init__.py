"""The web demo: ``create_app(model)`` is a FastAPI app with one click-to-segment page (``linmix serve``).

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart, Pillow).
"""

from linmix.serve.app import ImageCache, ServeLimits, create_app

__all__ = ["ImageCache", "ServeLimits", "create_app"]
