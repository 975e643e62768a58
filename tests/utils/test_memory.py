"""linmix.utils.memory: the glibc allocator tuning keeps freed buffers for reuse; arguments are checked."""

import os
import subprocess
import sys

import pytest

from linmix.utils.memory import tune_cpu_allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator tuning is Linux-only")

# Resident memory given back when a 64 MiB tensor is freed, in a fresh process.
_FREE_AND_MEASURE = """
import sys, torch
from linmix.utils.memory import tune_cpu_allocator, _status_kib
if sys.argv[1] == "tuned":
    assert tune_cpu_allocator() and tune_cpu_allocator()  # idempotent
x = torch.ones(16 << 20)  # 64 MiB of float32, touched
before = _status_kib("VmRSS")
del x
print((before - _status_kib("VmRSS")) / 1024)
"""


def _released_mib(mode: str) -> float:
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _FREE_AND_MEASURE, mode], check=True, capture_output=True, text=True, env=env_free)
    return float(out.stdout.strip())


def test_tuned_allocator_keeps_freed_buffers_for_reuse():
    # Default glibc serves 64 MiB with mmap and unmaps it on free (the next tensor page-faults again);
    # tuned, the buffer stays in the heap for the next allocation of that size.
    assert _released_mib("default") > 48
    assert _released_mib("tuned") < 8


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": -1}, {"trim_threshold": 1.5}, {"top_pad": True}])
def test_bad_arguments_are_named(kwargs, monkeypatch):
    monkeypatch.setattr("linmix.utils.memory._TUNED", False)
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        tune_cpu_allocator(**kwargs)
