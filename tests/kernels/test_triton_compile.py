"""The Triton kernels compile to a Hopper (sm_90) binary without a GPU: Triton's compiler
and its bundled ptxas run on any machine. The interpreter that runs the parity tests
accepts code the compiler rejects (types, static branches, loop-carried values), so this
is what says the kernels would build on a GPU. Each kernel in its main variants and in
float32, bfloat16 and float64; a subprocess, since the interpreter is on in this one."""

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


@pytest.mark.skipif(triton_kernels.IMPORT_ERROR is not None and
                    os.environ.get("BATCHNORM_REQUIRE_TRITON") != "1",
                    reason=f"TRITON NOT INSTALLED ({triton_kernels.IMPORT_ERROR}): pip install "
                           "'batchnorm[cuda]'")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    result = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(VARIANTS)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(" ok") == len(VARIANTS), result.stdout
