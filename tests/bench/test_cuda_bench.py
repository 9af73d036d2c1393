"""``batchnorm bench --device cuda`` without a GPU: its case list (dry run), and what it
times as "ours" (the public functional) against its torch eager column in float64:
outputs, input/weight/bias/residual gradients, and running statistics over several steps.

"ours" runs on the composite operators (fast) and, on tiny shapes, on the Triton kernels
(under Triton's interpreter without a GPU; skipped loudly without triton)."""

from __future__ import annotations

import os

import pytest
import torch

from batchnorm import kernels
from batchnorm.bench import cuda
from batchnorm.kernels import reference

STEPS = 3


def test_dry_run_lists_the_suite_without_a_gpu(capsys):
    assert cuda.main(["--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    suite = cuda.cases()
    assert len(lines) == len(suite) + 1  # header + one row per case
    labels = {(case.family, case.layout, case.dtype) for case in suite}
    for layout in ("NCHW", "NHWC"):
        for dtype in (torch.float32, torch.bfloat16):
            assert ("batch_norm", layout, dtype) in labels
            assert ("fused", layout, dtype) in labels
        assert ("ghost", layout, torch.float32) in labels
        assert ("renorm", layout, torch.float32) in labels
    assert {case.family for case in suite} >= {"layer_norm", "group_norm"}
    assert sum(case.residual for case in suite) >= 4
    bn = suite[0]
    assert bn.shape == (cuda.BATCH, 64, 112, 112) and bn.passes == 5
    assert bn.bytes_moved() == 5 * 4 * cuda.BATCH * 64 * 112 * 112


def test_filter_selects_and_rejects(capsys):
    assert cuda.main(["--dry-run", "--filter", "LayerNorm 4096x4096 bfloat16"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(lines) == 2 and "4096x4096 | bfloat16 | rows" in lines[1]
    with pytest.raises(SystemExit, match="matches no case"):
        cuda.main(["--dry-run", "--filter", "no such case"])
    with pytest.raises(SystemExit, match="--no-layers leaves nothing"):
        cuda.main(["--dry-run", "--no-layers", "--no-models"])


TINY = [cuda.CudaCase("batch_norm", (4, 3, 2, 3), torch.float64),
        cuda.CudaCase("batch_norm", (4, 3, 2, 3), torch.float64, channels_last=True),
        cuda.CudaCase("fused", (4, 3, 2, 3), torch.float64, True, "silu", residual=True),
        cuda.CudaCase("fused", (4, 3, 2, 3), torch.float64, False, "relu", residual=True),
        cuda.CudaCase("ghost", (6, 3, 2, 3), torch.float64, ghost=4),
        cuda.CudaCase("ghost", (6, 3, 2, 3), torch.float64, True, "elu", ghost=4),
        cuda.CudaCase("renorm", (4, 3, 2, 3), torch.float64, True, "relu"),
        cuda.CudaCase("layer_norm", (6, 10), torch.float64),
        cuda.CudaCase("group_norm", (3, 4, 2, 3), torch.float64, groups=2),
        cuda.CudaCase("batch_norm", (4, 3, 2, 3), torch.float64, True, "relu", mode="eval")]


def autograd_run(forward, tensors: dict[str, torch.Tensor], mode: str
                 ) -> dict[str, torch.Tensor]:
    """``forward`` (the bench's signature) with autograd, on the tensors' dtypes."""
    leaves = {name: tensors[name].detach().clone().requires_grad_()
              for name in ("x", "weight", "bias", "residual") if name in tensors}
    y = forward(leaves["x"], leaves["weight"], leaves["bias"], tensors["running_mean"],
                tensors["running_var"], leaves.get("residual"))
    if mode == "eval":
        return {"y": y}
    y.backward(tensors["dy"])
    out = {"y": y, **{f"{name}_grad": leaf.grad for name, leaf in leaves.items()}}
    return out


def check_case(case: cuda.CudaCase, dtype: torch.dtype, rtol: float) -> None:
    """STEPS steps of ``ours`` (in ``dtype``) and of torch (float64) on fresh data each step,
    both updating their own running statistics."""
    generator = torch.Generator().manual_seed(0)
    ours_state = torch_state = None
    for step in range(STEPS):
        tensors = case.tensors(torch.device("cpu"), generator)
        for name in ("x", "dy", "residual"):
            if name in tensors:
                tensors[name] = (tensors[name] * (1 + step) + step).to(dtype)
        if ours_state is None:  # running statistics away from (0, 1): renorm's r and d act
            channels = tensors["running_mean"].shape[0]
            start = {"running_mean": 0.3 * torch.randn(channels, generator=generator),
                     "running_var": torch.rand(channels, generator=generator) + 0.5}
            ours_state = {k: v.to(reference.accumulation_dtype(dtype)) for k, v in start.items()}
            torch_state = {k: v.double() for k, v in start.items()}
        ours_tensors = {**tensors, **ours_state}
        for name in ("weight", "bias"):  # parameters in the input's accumulation dtype
            ours_tensors[name] = tensors[name].to(reference.accumulation_dtype(dtype))
        result = autograd_run(cuda.ours_forward(case), ours_tensors, case.mode)
        expected = autograd_run(cuda.eager_forward(case), {
            **{name: t.double() for name, t in tensors.items()}, **torch_state}, case.mode)
        assert result.keys() == expected.keys()
        for name, value in expected.items():
            actual = result[name]
            assert actual.shape == value.shape, name
            if name.endswith("_grad") and name not in ("weight_grad", "bias_grad"):
                assert actual.stride() == tensors[name.removesuffix("_grad")].stride(), name
            scale = value.abs().max().clamp_min(1.0)
            error = (actual.double() - value).abs().max()
            assert error <= rtol * scale, f"step {step} {name}: {error:.3g} > {rtol} * {scale:.3g}"
        if case.family in ("batch_norm", "fused", "renorm") and case.mode == "train":
            for name in ("running_mean", "running_var"):
                assert torch.allclose(ours_state[name].double(), torch_state[name],
                                      rtol=rtol, atol=rtol), name


@pytest.mark.parametrize("case", TINY, ids=lambda case: f"{case.name}-{case.layout}")
def test_ours_matches_the_torch_column_in_float64(case):
    with kernels.use_backend("torch"):
        check_case(case, torch.float64, 1e-10)


@pytest.fixture(scope="module")
def triton_prims():
    from batchnorm.kernels import triton_kernels
    if triton_kernels.IMPORT_ERROR is not None:
        reason = f"TRITON NOT INSTALLED ({triton_kernels.IMPORT_ERROR}): pip install " \
                 "'batchnorm[cuda]'"
        if os.environ.get("BATCHNORM_REQUIRE_TRITON") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    if torch.cuda.is_available():
        pytest.skip("GPU PRESENT: Triton's interpreter is off where a GPU is seen; the "
                    "kernels run on CUDA tensors in test_triton_kernels.py and "
                    "test_exactness.py instead")
    if not triton_kernels.available("cpu"):
        pytest.fail("Triton kernels built without the interpreter: TRITON_INTERPRET=1 must be "
                    "set before they are imported")
    return triton_kernels


@pytest.mark.parametrize("case", [TINY[2], TINY[4], TINY[6], TINY[7], TINY[8]],
                         ids=lambda case: f"{case.name}-{case.layout}")
def test_ours_on_triton_matches_the_torch_column_in_float32(triton_prims, case):
    with kernels.use_backend("triton"):
        assert kernels.primitives(torch.zeros(1)) is triton_prims
        check_case(case, torch.float32, 2e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_run_without_a_gpu_says_what_it_needs():
    with pytest.raises(SystemExit, match="needs a CUDA GPU and the 'cuda' extra"):
        cuda.main(["--filter", "LayerNorm 8192x768 float32"])


def test_bench_cli_routes_device_cuda_to_the_gpu_suite(capsys):
    from batchnorm.cli import main

    assert main(["bench", "--device", "cuda", "--dry-run"]) == 0
    assert "GroupNorm (32)" in capsys.readouterr().out


def test_shared_flags_reach_the_gpu_suite(monkeypatch):
    """--no-compile, --compile-budget and --filter mean the GPU suite's own settings under
    --device cuda (the CPU parser must not swallow them), and CPU-only flags are refused."""
    from batchnorm import bench

    seen = []
    monkeypatch.setattr(cuda, "main", lambda argv: seen.append(cuda.parse_args(argv)) or 0)
    assert bench.main(["--no-compile", "--device", "cuda", "--filter", "LayerNorm",
                       "--compile-budget", "60", "--quick", "--out", "here"]) == 0
    args = seen[0]
    assert (args.no_compile, args.compile_budget, args.filter, args.quick, str(args.out)) == (
        True, 60.0, "LayerNorm", True, "here")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--tiny"])
