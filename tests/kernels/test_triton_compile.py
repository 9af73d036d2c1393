"""Without a GPU: the Triton kernels compile to a Hopper (sm_90) binary (Triton's compiler
and its bundled ptxas run on any machine), and the operators trace, with symbolic sizes,
into the kernels themselves, as torch.compile sees them.

The interpreter that runs the parity tests accepts code the compiler rejects (types,
static branches, loop-carried values), so the first test is what says the kernels would
build on a GPU: each kernel in its main variants, in float32, bfloat16 and float64. Both
run in a subprocess, since the interpreter is on in this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from batchnorm.kernels import triton_kernels

# kernel name, element type of the tensors, of the tables, constexprs
VARIANTS = [
    ("channel_reduce_kernel", "fp32", "fp32",
     {"BACKWARD": False, "HAS_RESIDUAL": False, "ACTIVATION": 0, "BP": 2, "BC": 1, "BQ": 1024}),
    ("channel_reduce_kernel", "bf16", "fp32",
     {"BACKWARD": True, "HAS_RESIDUAL": True, "ACTIVATION": 4, "BP": 32, "BC": 64, "BQ": 1}),
    ("channel_apply_kernel", "fp64", "fp64",
     {"BACKWARD": False, "HAS_RESIDUAL": False, "ACTIVATION": 3, "ONE_CHUNK": True, "BP": 1,
      "BC": 32, "BQ": 64}),
    ("channel_apply_kernel", "bf16", "fp32",
     {"BACKWARD": True, "HAS_RESIDUAL": True, "ACTIVATION": 4, "ONE_CHUNK": False, "BP": 32,
      "BC": 64, "BQ": 1}),
    ("finish_kernel", "fp32", "fp32", {"STATS": True, "BS": 64, "BT": 16}),
    ("rows_forward_kernel", "bf16", "fp32",
     {"HAS_WEIGHT": True, "HAS_BIAS": True, "BR": 2, "BK": 1024}),
    ("rows_backward_kernel", "fp32", "fp32",
     {"HAS_WEIGHT": True, "ONE_BLOCK": False, "BR": 1, "BK": 2048}),
]

COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from batchnorm.kernels import _triton_jit

TENSORS = {"x_ptr", "dy_ptr", "res_ptr", "out_ptr", "dres_ptr", "y_ptr", "dx_ptr", "w_ptr",
           "b_ptr"}
for name, element, table, constexprs in json.loads(sys.argv[1]):
    kernel = getattr(_triton_jit, name)
    signature = {arg: "constexpr" if arg in constexprs
                 else f"*{element}" if arg in TENSORS
                 else f"*{table}" if arg.endswith("_ptr")
                 else "fp32" if arg in ("param", "eps") else "i32"
                 for arg in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], name
    print(name, element, "ok")
"""


# A training step of BN + residual + ReLU through the operators, functionalized as
# torch.compile's AOT stage does it: each operator becomes its kernel launches.
TRACE = """
import torch
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from batchnorm.kernels import triton_kernels as tk

def step(x, residual, dy):
    mean, var = tk.channel_stats(x, 3)
    scale, shift = torch.rsqrt(var + 1e-5), torch.zeros_like(mean)
    y = tk.channel_normalize_residual(x, residual, mean, scale, shift, 3, "relu", 0.0)
    sum_g, sum_gc = tk.channel_backward_reduce_residual(dy, x, residual, mean, scale, shift,
                                                        3, "relu", 0.0)
    dx, d_residual = tk.channel_backward_input_residual(
        dy, x, residual, mean, scale, shift, scale, sum_g, sum_gc, 3, "relu", 0.0)
    return y, dx, d_residual

x = torch.randn(7, 3, 11)
graph = make_fx(dispatch_functionalize(step), tracing_mode="symbolic")(x, x.clone(), x.clone())
for node in graph.graph.nodes:
    if node.op == "call_function":
        print(node.target)
print("outputs", *(tuple(out.meta["val"].shape) for out in graph.graph.output_node().args[0]))
"""

REQUIRES_TRITON = pytest.mark.skipif(
    triton_kernels.IMPORT_ERROR is not None and
    os.environ.get("BATCHNORM_REQUIRE_TRITON") != "1",
    reason=f"TRITON NOT INSTALLED ({triton_kernels.IMPORT_ERROR}): pip install "
           "'batchnorm[cuda]'")


def run_without_interpreter(code: str, *args: str, cache_dir) -> str:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@REQUIRES_TRITON
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    out = run_without_interpreter(COMPILE, json.dumps(VARIANTS), cache_dir=tmp_path)
    assert out.count(" ok") == len(VARIANTS), out


@REQUIRES_TRITON
def test_operators_trace_into_their_kernel_launches(tmp_path):
    """No opaque operator call is left: stats (2 kernels), normalize (1), backward reduce
    (2), backward input (1), with the view's shape on every output."""
    lines = run_without_interpreter(TRACE, cache_dir=tmp_path).splitlines()
    assert not [line for line in lines if "batchnorm_triton" in line], lines
    assert sum(line == "triton_kernel_wrapper_functional" for line in lines) == 6, lines
    assert lines[-1] == "outputs (7, 3, 11) (7, 3, 11) (7, 3, 11)"
