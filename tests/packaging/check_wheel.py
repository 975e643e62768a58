#!/usr/bin/env python3
"""Build linmix's wheel, install it into a clean venv, and check it works outside the source tree.

The editable install the tests use reads every file from the checkout, so a file missing from the
wheel's package data (a C header, the weights, an example image, the web page) passes them all and
only breaks a user's ``pip install``. This script does what such a user does:

1. copies the tracked (and untracked, not ignored) files of the checkout into a temp folder, so no
   stale ``build/`` folder of an earlier build can slip a file into the wheel;
2. builds the wheel from that copy with ``pip wheel`` (build isolation, as ``pip install .``);
3. checks the wheel holds every file under ``src/`` (modules and data alike);
4. creates a clean venv (no system site-packages), installs ``torch==2.13.0`` first (the CPU build
   from local disk; never left to pip's resolver, which would pull a CUDA build), then the wheel
   with the ``sam`` extra;
5. runs ``installed_probe.py`` with that venv's ``python -I`` from a folder outside the source tree,
   with a fresh ``LINMIX_CACHE_DIR``: the native kernels compile from the installed sources and are
   used by the shipped model, ``linmix --version`` and ``linmix sam segment`` run, the examples and
   the web page are there.

Run by .ci/run after ``make test``:  ``.venv/bin/python tests/packaging/check_wheel.py``
(``--keep`` keeps the temp folder; ``TORCH_SPEC`` overrides the torch requirement, as in the Makefile).
Prints ``PASS`` / ``FAIL`` per check and a closing ``wheel-check: N passed, M failed`` line; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().with_name("installed_probe.py")
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
_IGNORED_PARTS = {"__pycache__", ".git", ".venv", "build", "dist", ".pytest_cache"}


class StepFailed(RuntimeError):
    pass


def _run(command: list) -> None:
    """Run a build or install step quietly; on failure raise with the tail of its output."""
    print("+", " ".join(map(str, command)), flush=True)
    started = time.monotonic()
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True)
    print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    if result.returncode != 0:
        raise StepFailed(f"{' '.join(map(str, command))} exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")


def _source_files() -> list[Path]:
    """The checkout's files as a clean clone (plus uncommitted ones) has them: git's list when
    there is a repository, else a walk that skips build outputs and caches."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=SOURCE_ROOT,
                                 capture_output=True, check=True).stdout
        files = [Path(name) for name in listing.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(SOURCE_ROOT) for p in SOURCE_ROOT.rglob("*") if p.is_file()]
    return [f for f in files if (SOURCE_ROOT / f).is_file() and not _IGNORED_PARTS & set(f.parts)
            and not f.name.endswith(".pyc") and not any(part.endswith(".egg-info") for part in f.parts)]


def _copy_source(target: Path) -> None:
    for relative in _source_files():
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SOURCE_ROOT / relative, destination)


def _missing_from_wheel(source: Path, wheel: Path) -> list[str]:
    """Files under source/src/ (the package tree: modules, kernels, weights, images, pages) not in the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    package_root = source / "src"
    wanted = [p.relative_to(package_root).as_posix() for p in package_root.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)]
    return sorted(name for name in wanted if name not in shipped)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = parser.parse_args()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="linmix-wheel-check-")).resolve()
    print(f"wheel check in {work}", flush=True)
    passed, failed = 0, 0
    try:
        source = work / "source"
        _copy_source(source)
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", source])
        (wheel,) = (work / "dist").glob("linmix-*.whl")
        print(f"built {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB)", flush=True)

        missing = _missing_from_wheel(source, wheel)
        if missing:
            failed += 1
            print(f"FAIL the wheel ships every file under src/: missing {missing} (add them to "
                  "[tool.setuptools.package-data] in pyproject.toml)", flush=True)
        else:
            passed += 1
            print("PASS the wheel ships every file under src/", flush=True)

        venv = work / "venv"
        _run([sys.executable, "-m", "venv", venv])  # clean: no --system-site-packages
        python = venv / "bin" / "python"
        # torch first and pinned: the wheel's own `torch>=2.3` is then already satisfied.
        _run([python, "-m", "pip", "install", "-q", TORCH_SPEC])
        _run([python, "-m", "pip", "install", "-q", f"{wheel}[sam]"])

        run_dir = work / "run"  # outside the source tree; the probe runs from here
        run_dir.mkdir()
        shutil.copy2(PROBE, run_dir / PROBE.name)
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith(("PYTHON", "LINMIX_")) and key != "VIRTUAL_ENV"}
        # A fresh kernel cache: a library built earlier from the checkout cannot mask a missing source.
        environment["LINMIX_CACHE_DIR"] = str(work / "kernel-cache")
        environment["PATH"] = f"{venv / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
        probe_started = time.monotonic()
        probe = subprocess.run([str(python), "-I", PROBE.name, str(SOURCE_ROOT), str(work)], cwd=run_dir,
                               env=environment, capture_output=True, text=True, timeout=600)
        print(probe.stdout, end="", flush=True)
        print(f"  (probe: {time.monotonic() - probe_started:.0f} s)", flush=True)
        lines = probe.stdout.splitlines()
        passed += sum(line.startswith("PASS ") for line in lines)
        failed += sum(line.startswith("FAIL ") for line in lines)
        if probe.returncode != 0 and not any(line.startswith("FAIL ") for line in lines):
            failed += 1
            print(f"FAIL the installed-package probe exited {probe.returncode}:\n{probe.stderr[-3000:]}", flush=True)
    except StepFailed as error:
        failed += 1
        print(f"FAIL building or installing the wheel: {error}", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wheel check took {time.monotonic() - started:.0f} s")
    print(f"wheel-check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
