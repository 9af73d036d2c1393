"""``batchnorm bench --device cuda``: the Triton kernels vs torch eager (cuDNN) and
torch.compile on one GPU, with the GPU's name and a memory-bandwidth roofline.

Cases: the BatchNorm shapes of ResNet-50 (batch 64, 224 px), NCHW and NHWC, float32 and
bfloat16, training step (forward + backward); BN + activation and BN + residual add +
ReLU (the ResNet block tail); ghost batches; Batch Renormalization; LayerNorm and
GroupNorm; an eval forward. Torch has no kernel for ghost batches or renorm: its eager
column is the usual composite (a loop of ``F.batch_norm`` over the chunks; renorm in
torch ops), which torch.compile then gets.

"ours" is :mod:`batchnorm.functional` with autograd, as a converted model runs it: the
plain layers on torch's native kernels (never cuDNN), the variants on the Triton kernels,
and, in training, the finite check of the batch statistics (one host synchronization per
BatchNorm call, which torch does not make). The roofline is the minimal traffic of the
case (``passes`` tensor-sized reads and writes) over this run's device copy bandwidth.
Times are medians of CUDA-event intervals over interleaved rounds; ``--dry-run`` lists the
cases without a GPU.
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

import torch
import torch.nn.functional as F
from torch import Tensor

from batchnorm import functional as ours
from batchnorm.bench import measure, report, training
from batchnorm.bench.measure import time_limit
from batchnorm.kernels.reference import accumulation_dtype

EPS = 1e-5
MOMENTUM = 0.1
RENORM_RMAX, RENORM_DMAX = 3.0, 5.0
BATCH = 64
# (C, H, W) of the BatchNorm layers of ResNet-50 at 224 x 224.
RESNET50_BN = ((64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
               (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7))
MODEL_ROUND_S = 0.2  # each model's calls per round fill at least this long
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


# ---- ours: the public functional (the operators, with autograd), as a converted model runs

def ours_forward(case: CudaCase) -> Callable[..., Tensor]:
    """:func:`eager_forward`'s signature and result through :mod:`batchnorm.functional`."""
    training = case.mode == "train"
    activation = None if case.activation == "identity" else case.activation
    param = ACTIVATION_PARAMS[case.activation] if case.activation in ("leaky_relu", "elu") \
        else None

    def forward(x, weight, bias, running_mean, running_var, residual=None):
        if case.family == "layer_norm":
            return ours.layer_norm(x, (x.shape[-1],), weight, bias, EPS)
        if case.family == "group_norm":
            return ours.group_norm(x, case.groups, weight, bias, EPS)
        options = {"activation": activation, "activation_param": param, "residual": residual}
        if case.family == "ghost":
            return ours.batch_norm(x, None, None, weight, bias, True, 0.0, EPS,
                                   ghost_batch_size=case.ghost, **options)
        if case.family == "renorm":
            options.update(renorm=True, renorm_clipping={
                "rmax": RENORM_RMAX, "rmin": 1 / RENORM_RMAX, "dmax": RENORM_DMAX})
        return ours.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM,
                               EPS, **options)
    return forward


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


def run_case(case: CudaCase, device: torch.device, bandwidth: float, rounds: int,
             warmup: int, compile_budget_s: float | None) -> dict[str, object]:
    tensors = case.tensors(device, torch.Generator().manual_seed(0))
    steps = {"ours": torch_step(case, tensors, ours_forward(case)),
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


def markdown(results: dict[str, object]) -> str:
    info = results["gpu"]
    peak = info["peak_bandwidth_gbs"]
    lines = [f"GPU: {info['gpu']} ({info['memory_gib']:.0f} GiB, {info['multiprocessors']} "
             f"SMs), torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"cuDNN {info['cudnn']}.",
             f"Copy bandwidth (read + write): {results['copy_bandwidth_gbs']:.0f} GB/s"
             + (f" (peak from the memory clock and bus: {peak:.0f} GB/s)" if peak else "")
             + f"; {results['rounds']} interleaved rounds, median ms (CUDA events).", "",
             "| case | shape | dtype | layout | mode | ours ms | eager ms | vs eager | "
             "compile ms | vs compile | roofline ms | ours / roofline |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        compiled = _ms(row["compile_ms"]) if row["compile_ms"] is not None else row[
            "compile_note"]
        lines.append(f"| {row['case']} | {'x'.join(map(str, row['shape']))} | {row['dtype']} "
                     f"| {row['layout']} | {row['mode']} | {_ms(row['ours_ms'])} | "
                     f"{_ms(row['eager_ms'])} | {_ratio(row['speedup_vs_eager'])} | "
                     f"{compiled} | {_ratio(row['speedup_vs_compile'])} | "
                     f"{_ms(row['roofline_ms'])} | {_ratio(row['ours_over_roofline'])} |")
    if results["models"]:
        lines += ["", *report.models_markdown(results["models"], results["models_summary"])]
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
    parser.add_argument("--no-models", action="store_true",
                        help="skip the real-model section (training steps of whole models)")
    parser.add_argument("--no-layers", action="store_true",
                        help="skip the single-layer cases (only the real-model section)")
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
    if args.no_layers and (args.no_models or args.filter):
        raise SystemExit("--no-layers leaves nothing to run with --no-models or --filter "
                         "(which skips the models)")
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
    for case in [] if args.no_layers else selected:
        began = time.perf_counter()
        rows.append(run_case(case, device, bandwidth, rounds, warmup, budget))
        if budget is not None and rows[-1]["compile_ms"] is not None:
            budget -= time.perf_counter() - began
        torch.cuda.empty_cache()
        print(f"{_label(case)}: ours {rows[-1]['ours_ms']:.3f} ms, eager "
              f"{rows[-1]['eager_ms']:.3f} ms", flush=True)
    models = [] if args.no_models or args.filter else run_models(device, rounds, warmup, budget)
    results = {"gpu": gpu_info(device), "copy_bandwidth_gbs": bandwidth / 1e9,
               "rounds": rounds, "rows": rows, "models": models,
               "models_summary": report.summarize(
                   models, lambda row: (row["mode"], row["layout"]), ("mode", "layout")),
               "wall_s": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results-cuda.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "results-cuda.md").write_text(text)
    print(text)
    return 0


def run_models(device: torch.device, rounds: int, warmup: int, budget_s: float | None
               ) -> list[dict[str, object]]:
    """The CPU bench's real-model rows (:mod:`batchnorm.bench.training`) on the GPU."""
    return training.run_all(list(training.MODELS), measure.Compiler(budget_s), rounds, warmup,
                            MODEL_ROUND_S, measure.Limits(), device)
