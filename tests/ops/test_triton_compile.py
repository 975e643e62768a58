"""linmix's Triton kernels compile for an H100 (sm_90) down to a cubin, without a GPU.

The interpreter tests check the arithmetic but accept code the real compiler rejects (types of loop
bounds, scalar casts, ...). Triton compiles ahead of time for a named target with its bundled
ptxas, so compilation is checked here too. It runs in a subprocess: kernels are built as interpreted
functions when TRITON_INTERPRET=1 is set at import, which the interpreter tests do in this process.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from linmix.ops.triton import bi_wkv as wkv, taylor_step as step

    def build(kernel, signature, constexprs):
        source = ASTSource(fn=kernel, signature={**signature, **{name: "constexpr" for name in constexprs}}, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert len(compiled.asm["cubin"]) > 0
        print(kernel.__name__, "compiled")

    def ints(*names):
        return {name: "i32" for name in names}

    act = "bf16"  # activations; states and scratch are fp32
    build(wkv._chunk_summaries_kernel, {"w_ptr": "*fp32", "k_ptr": f"*{act}", "v_ptr": f"*{act}", "summary_ptr": "*fp32",
          **ints("length", "channels", "chunk", "chunks", "stride_b", "stride_t")}, {"EMPTY": -1e38, "BLOCK_C": 32})
    build(wkv._chunk_states_kernel, {"w_ptr": "*fp32", "summary_ptr": "*fp32", "incoming_ptr": "*fp32",
          **ints("length", "channels", "chunk", "chunks")}, {"EMPTY": -1e38, "BLOCK_C": 32})
    build(wkv._chunk_output_kernel, {"w_ptr": "*fp32", "u_ptr": "*fp32", "k_ptr": f"*{act}", "v_ptr": f"*{act}",
          "y_ptr": f"*{act}", "incoming_ptr": "*fp32", "before_ptr": "*fp32",
          **ints("length", "channels", "chunk", "chunks", "stride_b", "stride_t", "stride_yb", "stride_yt")},
          {"EMPTY": -1e38, "BLOCK_C": 32})
    pointers = {"q_ptr": f"*{act}", "k_ptr": f"*{act}", "v_ptr": f"*{act}", "kv_ptr": "*fp32", "k_sum_ptr": "*fp32",
                "out_ptr": f"*{act}", "first_ptr": "*i32", "second_ptr": "*i32", "scale_ptr": "*fp32"}
    strides = ints(*[f"stride_{t}{d}" for t, ds in (("q", "bhf"), ("k", "bhf"), ("v", "bhd"), ("s", "bhed"), ("z", "bhe"),
                                                     ("o", "bhd")) for d in ds])
    build(step._taylor_step_kernel, {**pointers, **ints("heads", "expanded_dim", "value_dim"), "eps": "fp32", **strides},
          {"BLOCK_E": 256, "BLOCK_V": 32})
''')


def test_kernels_compile_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 4
