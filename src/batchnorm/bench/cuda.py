"""``batchnorm bench --device cuda``: the Triton kernels vs torch eager (cuDNN) and
torch.compile on one GPU, with the GPU's name and a memory-bandwidth roofline.

Cases: the BatchNorm shapes of ResNet-50 (batch 64, 224 px), NCHW and NHWC, float32 and
bfloat16, training step (forward + backward); BN + activation and BN + residual add +
ReLU (the ResNet block tail); ghost batches; Batch Renormalization; LayerNorm and
GroupNorm; an eval forward. Torch has no kernel for ghost batches or renorm: its eager
column is the usual composite (a loop of ``F.batch_norm`` over the chunks; renorm in
torch ops), which torch.compile then gets.

"ours" runs the kernel primitives as the CUDA operators call them: statistics, normalize;
backward reduce, backward input; the per-channel tables between them in torch ops. The
roofline is the minimal traffic of the case (``passes`` tensor-sized reads and writes) over
this run's device copy bandwidth. Times are medians of CUDA-event intervals over
interleaved rounds; ``--dry-run`` lists the cases without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from batchnorm.bench.measure import time_limit
from batchnorm.kernels.reference import accumulation_dtype, chunk_counts

EPS = 1e-5
MOMENTUM = 0.1
RENORM_RMAX, RENORM_DMAX = 3.0, 5.0
BATCH = 64
# (C, H, W) of the BatchNorm layers of ResNet-50 at 224 x 224.
RESNET50_BN = ((64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
               (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7))
ACTIVATION_PARAMS = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.01, "elu": 1.0,
                     "silu": 0.0}


@dataclass(frozen=True)
class CudaCase:
    """One row. ``family``: batch_norm, fused, ghost, renorm, layer_norm, group_norm."""

    family: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    activation: str = "identity"
    residual: bool = False
    ghost: int | None = None  # samples per ghost batch
    groups: int | None = None  # GroupNorm
    mode: str = "train"

    @property
    def name(self) -> str:
        parts = {"batch_norm": "BN", "fused": "BN", "ghost": f"ghost BN ({self.ghost})",
                 "renorm": "BatchRenorm", "layer_norm": "LayerNorm",
                 "group_norm": f"GroupNorm ({self.groups})"}[self.family]
        if self.residual:
            parts += "+add"
        if self.activation != "identity":
            parts += f"+{self.activation}"
        if self.mode == "eval":
            parts += " eval"
        return parts

    @property
    def layout(self) -> str:
        if len(self.shape) == 2:
            return "rows"
        return "NHWC" if self.channels_last else "NCHW"

    @property
    def passes(self) -> int:
        """Minimal traffic in tensor-sized passes: train reads x, writes y; reads dy, x,
        writes dx (5); a residual adds its read forward and d residual's write backward
        (7, with the ReLU mask read back from y); eval reads x and writes y (2)."""
        if self.mode == "eval":
            return 2
        return 7 if self.residual else 5

    def bytes_moved(self) -> int:
        return self.passes * math.prod(self.shape) * torch.empty((), dtype=self.dtype
                                                                 ).element_size()

    def tensors(self, device: torch.device, generator: torch.Generator) -> dict[str, Tensor]:
        """x, dy (and residual) of the case, weight/bias and running statistics."""
        def draw(shape: tuple[int, ...]) -> Tensor:
            t = torch.randn(shape, generator=generator).to(device, self.dtype)
            return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

        params = self.shape[-1] if self.family == "layer_norm" else self.shape[1]
        out = {"x": draw(self.shape), "dy": draw(self.shape),
               "weight": (torch.rand(params, generator=generator) + 0.5).to(device),
               "bias": torch.randn(params, generator=generator).to(device),
               "running_mean": torch.zeros(params, device=device),
               "running_var": torch.ones(params, device=device)}
        if self.residual:
            out["residual"] = draw(self.shape)
        if self.dtype != torch.float32 and self.family in ("layer_norm", "group_norm"):
            out["weight"], out["bias"] = (out[k].to(self.dtype) for k in ("weight", "bias"))
        return out


def cases(batch: int = BATCH) -> list[CudaCase]:
    """The suite, in report order."""
    suite = [CudaCase("batch_norm", (batch, *chw), dtype, channels_last)
             for dtype in (torch.float32, torch.bfloat16) for channels_last in (False, True)
             for chw in RESNET50_BN]
    tail = (batch, 256, 56, 56)
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            suite += [CudaCase("fused", tail, dtype, channels_last, "relu"),
                      CudaCase("fused", tail, dtype, channels_last, "relu", residual=True)]
    suite += [CudaCase("fused", tail, torch.bfloat16, True, "silu"),
              CudaCase("fused", (batch, 1024, 14, 14), torch.bfloat16, True, "relu",
                       residual=True)]
    for channels_last in (False, True):
        suite += [CudaCase("ghost", (4 * batch, 256, 28, 28), torch.float32, channels_last,
                           ghost=32),
                  CudaCase("renorm", tail, torch.float32, channels_last, "relu"),
                  CudaCase("batch_norm", tail, torch.float32, channels_last, mode="eval")]
    for dtype in (torch.float32, torch.bfloat16):
        suite += [CudaCase("layer_norm", (8192, 768), dtype),
                  CudaCase("layer_norm", (4096, 4096), dtype),
                  CudaCase("group_norm", tail, dtype, groups=32)]
    return suite


# ---- torch: the eager composite (cuDNN where torch has a kernel), also what compile gets

def activate(y: Tensor, activation: str) -> Tensor:
    param = ACTIVATION_PARAMS[activation]
    functions = {"identity": lambda t: t, "relu": F.relu,
                 "leaky_relu": lambda t: F.leaky_relu(t, param),
                 "elu": lambda t: F.elu(t, param), "silu": F.silu}
    return functions[activation](y)


def renorm_eager(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                 running_var: Tensor, training: bool = True) -> Tensor:
    """Batch Renormalization (Ioffe 2017) in torch ops: ``y = w * (x_hat * r + d) + b``
    with ``r = clip(std_B / std, 1/rmax, rmax)``, ``d = clip((mean_B - mean) / std,
    -dmax, dmax)`` from the running statistics, both without gradient; updates those."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *([1] * (x.dim() - 2)))
    xf = x.to(accumulation_dtype(x.dtype))
    mean = xf.mean(dims)
    var = xf.var(dims, unbiased=False)
    std = torch.sqrt(var + EPS)
    running_std = torch.sqrt(running_var + EPS)
    r = (std / running_std).clamp(1 / RENORM_RMAX, RENORM_RMAX).detach()
    d = ((mean - running_mean) / running_std).clamp(-RENORM_DMAX, RENORM_DMAX).detach()
    x_hat = (xf - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
    y = x_hat * weight.view(shape) + bias.view(shape)
    with torch.no_grad():
        count = x.numel() // x.shape[1]
        running_mean.lerp_(mean.to(running_mean.dtype), MOMENTUM)
        running_var.lerp_((var * count / (count - 1)).to(running_var.dtype), MOMENTUM)
    return y.to(x.dtype)


def eager_forward(case: CudaCase) -> Callable[..., Tensor]:
    """``f(x, weight, bias, running_mean, running_var[, residual])`` in torch ops."""
    training = case.mode == "train"

    def forward(x, weight, bias, running_mean, running_var, residual=None):
        if case.family == "layer_norm":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)
        if case.family == "group_norm":
            return F.group_norm(x, case.groups, weight, bias, EPS)
        if case.family == "ghost":
            y = torch.cat([F.batch_norm(part, None, None, weight, bias, True, 0.0, EPS)
                           for part in x.split(case.ghost)])
        elif case.family == "renorm":
            y = renorm_eager(x, weight, bias, running_mean, running_var)
        else:
            y = F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM,
                             EPS)
        if residual is not None:
            y = y + residual
        return activate(y, case.activation)
    return forward


# ---- ours: the primitives, as the operators call them (no autograd)

def channel_view(x: Tensor) -> tuple[Tensor, int]:
    """``(N, C, *spatial)`` as the (P, C, Q) view, without a copy, and its rows per sample:
    NCHW ``(N, C, H*W)``, 1 row per sample; channels-last ``(N*H*W, C, 1)``, H*W rows."""
    if x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        return x.movedim(1, -1).reshape(-1, x.shape[1], 1), math.prod(x.shape[2:])
    return x.reshape(x.shape[0], x.shape[1], -1), 1


def restore(view: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`channel_view` for a tensor laid out as ``view``."""
    if like.dim() > 2 and view.shape[0] != like.shape[0]:
        return view.view(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)
    return view.view(like.shape)


def batch_norm_step(prims: ModuleType, x: Tensor, dy: Tensor, weight: Tensor, bias: Tensor,
                    running_mean: Tensor | None = None, running_var: Tensor | None = None, *,
                    activation: str = "identity", residual: Tensor | None = None,
                    ghost: int | None = None, renorm: bool = False) -> dict[str, Tensor]:
    """Training forward and backward of BN (+ residual) + activation through ``prims``.

    Tables per (chunk, channel): ``scale = w * invstd * r``, ``shift = b + w * d`` (r = 1,
    d = 0 without renorm); backward ``k1 = scale``, ``k0 = -k1 * sum(g) / n``,
    ``k2 = -k1 * invstd^2 * sum(g * (x - mean)) / n``; ``dw = sum over chunks of
    r * invstd * sum(g * (x - mean)) + d * sum(g)``, ``db = sum of sum(g)``. Running
    statistics (one chunk only) are updated as torch does, unbiased variance."""
    param = ACTIVATION_PARAMS[activation]
    view, rows_per_sample = channel_view(x)
    dy_view = channel_view(dy)[0]
    rows, _, quantity = view.shape
    chunk = rows if ghost is None else ghost * rows_per_sample
    acc = accumulation_dtype(x.dtype)
    mean, var = prims.channel_stats(view, chunk)
    invstd = torch.rsqrt(var + EPS)
    w, b = weight.to(acc), bias.to(acc)
    r, d = torch.ones_like(mean), torch.zeros_like(mean)
    if renorm:
        running_std = torch.sqrt(running_var.to(acc) + EPS)
        r = (torch.sqrt(var + EPS) / running_std).clamp(1 / RENORM_RMAX, RENORM_RMAX)
        d = ((mean - running_mean.to(acc)) / running_std).clamp(-RENORM_DMAX, RENORM_DMAX)
    scale = w * invstd * r
    shift = b + w * d
    if residual is None:
        y = prims.channel_normalize(view, mean, scale, shift, chunk, activation, param)
        sum_g, sum_gc = prims.channel_backward_reduce(dy_view, view, mean, scale, shift, chunk,
                                                      activation, param)
    else:
        res_view = channel_view(residual)[0]
        y = prims.channel_normalize_residual(view, res_view, mean, scale, shift, chunk,
                                             activation, param)
        sum_g, sum_gc = prims.channel_backward_reduce_residual(
            dy_view, view, res_view, mean, scale, shift, chunk, activation, param)
    counts = chunk_counts(rows, chunk, quantity, acc, x.device).unsqueeze(1)
    k1 = scale
    k0 = -k1 * sum_g / counts
    k2 = -k1 * invstd * invstd * sum_gc / counts
    out = {"y": restore(y, x), "weight_grad": (r * invstd * sum_gc + d * sum_g).sum(0),
           "bias_grad": sum_g.sum(0)}
    if residual is None:
        dx = prims.channel_backward_input(dy_view, view, mean, scale, shift, k1, k0, k2, chunk,
                                          activation, param)
    else:
        dx, d_res = prims.channel_backward_input_residual(
            dy_view, view, res_view, mean, scale, shift, k1, k0, k2, chunk, activation, param)
        out["residual_grad"] = restore(d_res, residual)
    out["x_grad"] = restore(dx, x)
    if running_mean is not None and mean.shape[0] == 1:
        count = rows * quantity
        running_mean.lerp_(mean[0].to(running_mean.dtype), MOMENTUM)
        running_var.lerp_((var[0] * count / max(count - 1, 1)).to(running_var.dtype),
                          MOMENTUM)
    return out


def batch_norm_eval(prims: ModuleType, x: Tensor, weight: Tensor, bias: Tensor,
                    running_mean: Tensor, running_var: Tensor, activation: str = "identity"
                    ) -> Tensor:
    view = channel_view(x)[0]
    acc = accumulation_dtype(x.dtype)
    scale = (weight.to(acc) * torch.rsqrt(running_var.to(acc) + EPS)).view(1, -1)
    y = prims.channel_normalize(view, running_mean.to(acc).view(1, -1), scale,
                                bias.to(acc).view(1, -1), view.shape[0], activation,
                                ACTIVATION_PARAMS[activation])
    return restore(y, x)


def layer_norm_step(prims: ModuleType, x: Tensor, dy: Tensor, weight: Tensor, bias: Tensor
                    ) -> dict[str, Tensor]:
    rows = x.reshape(-1, x.shape[-1])
    y, mean, invstd = prims.rows_forward(rows, weight, bias, EPS)
    dx, weight_grad, bias_grad = prims.rows_backward(dy.reshape(rows.shape), rows, mean,
                                                     invstd, weight)
    return {"y": y.view(x.shape), "x_grad": dx.view(x.shape), "weight_grad": weight_grad,
            "bias_grad": bias_grad}


def group_norm_step(prims: ModuleType, x: Tensor, dy: Tensor, weight: Tensor, bias: Tensor,
                    groups: int) -> dict[str, Tensor]:
    """GroupNorm (NCHW): statistics per (sample, group) on the ``(N, G, C/G * HW)`` view,
    then the channel primitives on ``(N, C, HW)`` with chunk 1 and (N, C) tables
    ``mean``, ``scale = invstd * w``, ``shift = b``; backward per group ``k1 = scale``,
    ``k0 = -invstd * mean_group(g * w)``, ``k2 = -invstd^2 * mean_group(g * w * x_hat)``."""
    batch, channels = x.shape[:2]
    per_group = channels // groups
    x = x.contiguous()
    view = x.view(batch, channels, -1)
    dy_view = dy.contiguous().view(view.shape)
    acc = accumulation_dtype(x.dtype)
    group_mean, group_var = prims.channel_stats(x.view(batch, groups, -1), 1)
    group_invstd = torch.rsqrt(group_var + EPS)
    mean = group_mean.repeat_interleave(per_group, 1)
    invstd = group_invstd.repeat_interleave(per_group, 1)
    w, b = weight.to(acc), bias.to(acc)
    scale = invstd * w
    shift = b.expand(batch, channels).contiguous()
    y = prims.channel_normalize(view, mean, scale, shift, 1, "identity", 0.0)
    sum_g, sum_gc = prims.channel_backward_reduce(dy_view, view, mean, scale, shift, 1,
                                                  "identity", 0.0)
    count = per_group * view.shape[2]
    mean_gh = (w * sum_g).view(batch, groups, per_group).sum(2) / count
    mean_gh_xhat = (w * sum_gc).view(batch, groups, per_group).sum(2) * group_invstd / count
    k0 = -invstd * mean_gh.repeat_interleave(per_group, 1)
    k2 = -invstd * invstd * mean_gh_xhat.repeat_interleave(per_group, 1)
    dx = prims.channel_backward_input(dy_view, view, mean, scale, shift, scale, k0, k2, 1,
                                      "identity", 0.0)
    return {"y": y.view(x.shape), "x_grad": dx.view(x.shape),
            "weight_grad": (sum_gc * invstd).sum(0), "bias_grad": sum_g.sum(0)}


def ours_step(prims: ModuleType, case: CudaCase, tensors: dict[str, Tensor]
              ) -> Callable[[], object]:
    """One call of the case through ``prims``: a training step, or an eval forward."""
    t = tensors
    if case.mode == "eval":
        return lambda: batch_norm_eval(prims, t["x"], t["weight"], t["bias"],
                                       t["running_mean"], t["running_var"], case.activation)
    if case.family == "layer_norm":
        return lambda: layer_norm_step(prims, t["x"], t["dy"], t["weight"], t["bias"])
    if case.family == "group_norm":
        return lambda: group_norm_step(prims, t["x"], t["dy"], t["weight"], t["bias"],
                                       case.groups)
    return lambda: batch_norm_step(
        prims, t["x"], t["dy"], t["weight"], t["bias"], t["running_mean"], t["running_var"],
        activation=case.activation, residual=t.get("residual"), ghost=case.ghost,
        renorm=case.family == "renorm")


def torch_step(case: CudaCase, tensors: dict[str, Tensor],
               forward: Callable[..., Tensor]) -> Callable[[], object]:
    """One call of ``forward`` (eager or compiled) as the case runs it, with autograd."""
    t = tensors
    stats = (t["running_mean"], t["running_var"])
    if case.mode == "eval":
        def evaluate() -> object:
            with torch.no_grad():
                return forward(t["x"], t["weight"], t["bias"], *stats)
        return evaluate
    names = ["x", "weight", "bias"] + (["residual"] if case.residual else [])
    leaves = {name: t[name].detach().requires_grad_() for name in names}

    def train() -> object:
        for leaf in leaves.values():
            leaf.grad = None
        y = forward(leaves["x"], leaves["weight"], leaves["bias"], *stats,
                    leaves.get("residual"))
        y.backward(t["dy"])
        return leaves["x"].grad
    return train


# ---- measurement

def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device ``copy_`` (read + write) of ``megabytes``."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times)


def medians_ms(steps: dict[str, Callable[[], object]], rounds: int, warmup: int
               ) -> dict[str, float]:
    """Median milliseconds of each step over interleaved rounds, by CUDA events."""
    for _ in range(warmup):
        for run in steps.values():
            run()
    torch.cuda.synchronize()
    events = {name: [] for name in steps}
    for _ in range(rounds):
        for name, run in steps.items():
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            run()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(start.elapsed_time(end) for start, end in pairs)
            for name, pairs in events.items()}


def gpu_info(device: torch.device) -> dict[str, object]:
    import triton

    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    peak = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None
    return {"gpu": props.name, "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count, "peak_bandwidth_gbs": peak,
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version()}


def run_case(prims: ModuleType, case: CudaCase, device: torch.device, bandwidth: float,
             rounds: int, warmup: int, compile_budget_s: float | None) -> dict[str, object]:
    tensors = case.tensors(device, torch.Generator().manual_seed(0))
    steps = {"ours": ours_step(prims, case, tensors),
             "eager": torch_step(case, tensors, eager_forward(case))}
    compile_note = "n/a (--no-compile)"
    if compile_budget_s is not None:
        if compile_budget_s <= 0:
            compile_note = "n/a (compile time budget spent)"
        else:
            compiled = torch_step(case, tensors, torch.compile(eager_forward(case)))
            began = time.perf_counter()
            try:
                with time_limit(compile_budget_s):
                    compiled()
                steps["compile"] = compiled
                compile_note = f"compiled in {time.perf_counter() - began:.1f} s"
            except Exception as error:  # a failed compile is a result to report
                torch._dynamo.reset()
                compile_note = f"n/a ({type(error).__name__}: {str(error)[:80]})"
    medians = medians_ms(steps, rounds, warmup)
    roofline_ms = 1e3 * case.bytes_moved() / bandwidth
    ours = medians["ours"]
    return {"family": case.family, "case": case.name, "shape": list(case.shape),
            "dtype": str(case.dtype).removeprefix("torch."), "layout": case.layout,
            "mode": case.mode, "ours_ms": ours, "eager_ms": medians["eager"],
            "compile_ms": medians.get("compile"), "compile_note": compile_note,
            "roofline_ms": roofline_ms, "speedup_vs_eager": medians["eager"] / ours,
            "speedup_vs_compile": medians["compile"] / ours if "compile" in medians else None,
            "ours_over_roofline": ours / roofline_ms}


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(report: dict[str, object]) -> str:
    info = report["gpu"]
    peak = info["peak_bandwidth_gbs"]
    lines = [f"GPU: {info['gpu']} ({info['memory_gib']:.0f} GiB, {info['multiprocessors']} "
             f"SMs), torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"cuDNN {info['cudnn']}.",
             f"Copy bandwidth (read + write): {report['copy_bandwidth_gbs']:.0f} GB/s"
             + (f" (peak from the memory clock and bus: {peak:.0f} GB/s)" if peak else "")
             + f"; {report['rounds']} interleaved rounds, median ms (CUDA events).", "",
             "| case | shape | dtype | layout | mode | ours ms | eager ms | vs eager | "
             "compile ms | vs compile | roofline ms | ours / roofline |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        compiled = _ms(row["compile_ms"]) if row["compile_ms"] is not None else row[
            "compile_note"]
        lines.append(f"| {row['case']} | {'x'.join(map(str, row['shape']))} | {row['dtype']} "
                     f"| {row['layout']} | {row['mode']} | {_ms(row['ours_ms'])} | "
                     f"{_ms(row['eager_ms'])} | {_ratio(row['speedup_vs_eager'])} | "
                     f"{compiled} | {_ratio(row['speedup_vs_compile'])} | "
                     f"{_ms(row['roofline_ms'])} | {_ratio(row['ours_over_roofline'])} |")
    return "\n".join(lines) + "\n"


def dry_run(selected: list[CudaCase]) -> str:
    """The case list with each case's minimal traffic, without a GPU."""
    lines = ["| case | shape | dtype | layout | mode | passes | MiB moved |",
             "|---|---|---|---|---|---:|---:|"]
    for case in selected:
        lines.append(f"| {case.name} | {'x'.join(map(str, case.shape))} | "
                     f"{str(case.dtype).removeprefix('torch.')} | {case.layout} | {case.mode} | "
                     f"{case.passes} | {case.bytes_moved() / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batchnorm bench --device cuda", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for results-cuda.json and results-cuda.md")
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument("--filter", default="", help="only cases whose name, shape, dtype "
                        "or layout contains this substring")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size of the CNN cases")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--compile-budget", type=float, default=900.0,
                        help="seconds of torch.compile allowed over the whole run")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cases and their traffic; needs no GPU")
    return parser.parse_args(argv)


def _label(case: CudaCase) -> str:
    return (f"{case.name} {'x'.join(map(str, case.shape))} "
            f"{str(case.dtype).removeprefix('torch.')} {case.layout}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = [case for case in cases(args.batch) if args.filter in _label(case)]
    if not selected:
        raise SystemExit(f"--filter {args.filter!r} matches no case")
    if args.dry_run:
        print(dry_run(selected), end="")
        return 0
    from batchnorm.kernels import triton_kernels

    if not torch.cuda.is_available() or not triton_kernels.available("cuda"):
        raise SystemExit("batchnorm bench --device cuda needs a CUDA GPU and the 'cuda' extra "
                         f"(pip install 'batchnorm[cuda]'); triton import error: "
                         f"{triton_kernels.IMPORT_ERROR}")
    device = torch.device("cuda")
    rounds, warmup = (5, 2) if args.quick else (25, 5)
    bandwidth = copy_bandwidth(device, 256 if args.quick else 2048)
    budget = None if args.no_compile else args.compile_budget
    rows = []
    started = time.perf_counter()
    for case in selected:
        began = time.perf_counter()
        rows.append(run_case(triton_kernels, case, device, bandwidth, rounds, warmup, budget))
        if budget is not None and rows[-1]["compile_ms"] is not None:
            budget -= time.perf_counter() - began
        torch.cuda.empty_cache()
        print(f"{_label(case)}: ours {rows[-1]['ours_ms']:.3f} ms, eager "
              f"{rows[-1]['eager_ms']:.3f} ms", flush=True)
    report = {"gpu": gpu_info(device), "copy_bandwidth_gbs": bandwidth / 1e9,
              "rounds": rounds, "rows": rows, "wall_s": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results-cuda.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "results-cuda.md").write_text(text)
    print(text)
    return 0
