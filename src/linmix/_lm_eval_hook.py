"""Import hook that registers ``lm_eval --model linmix`` (stdlib only: runs at interpreter start-up).

lm-eval 0.4.13 fills its model registry from a fixed table when ``lm_eval.models`` is imported and
has no plug-in discovery. ``linmix_lm_eval.pth`` in site-packages imports this module, which waits
for that import and then adds the lazy placeholder ``"linmix" -> linmix.lm.lm_eval_adapter:LinmixLM``
(nothing of linmix or torch is imported until lm-eval actually asks for the model).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

_WATCHED = "lm_eval.models"
PTH_NAME = "linmix_lm_eval.pth"


def _register_linmix() -> None:
    from lm_eval.api.registry import model_registry

    if "linmix" not in model_registry:
        model_registry.register("linmix", target="linmix.lm.lm_eval_adapter:LinmixLM")


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_linmix()


class _LmEvalModelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    if _WATCHED in sys.modules:  # lm-eval already imported: register now
        _register_linmix()
    elif not any(isinstance(finder, _LmEvalModelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LmEvalModelsFinder())


def write_pth(site_dir: str | Path | None = None) -> Path:
    """Write ``linmix_lm_eval.pth`` into ``site_dir`` (default: this environment's site-packages);
    every interpreter of the environment then runs :func:`install` at start-up."""
    import sysconfig

    directory = Path(site_dir or sysconfig.get_paths()["purelib"])
    if not directory.is_dir():
        raise FileNotFoundError(f"no site-packages folder at {directory}")
    path = directory / PTH_NAME
    # .pth lines starting with "import" are executed at start-up; this module is stdlib-only.
    path.write_text("import linmix._lm_eval_hook\n")
    return path


install()
