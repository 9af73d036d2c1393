"""Train a small CNN with SyncBatchNorm under DistributedDataParallel on MNIST.

    torchrun --nproc_per_node=2 -m batchnorm.examples.ddp_mnist            # CPU, gloo
    torchrun --nproc_per_node=4 -m batchnorm.examples.ddp_mnist --backend nccl  # GPUs

Uses MNIST as :func:`batchnorm.data.load_requested_split` finds it (with only the
official test files present: 8,000 images train, 2,000 validate); without MNIST and
without --data-dir it trains on scikit-learn's bundled 8x8 digits and says so, and a
--data-dir without MNIST stops with one line saying how to get it. The model is built with
``torch.nn.BatchNorm2d`` and converted by :func:`convert_sync_batchnorm`, so every BN
layer normalizes with the statistics of the global batch. Each epoch prints the mean
training loss over all processes, the validation accuracy over all processes, and the
largest difference of the BN running statistics between processes (0: in sync).
Without torchrun it trains in one process, where SyncBatchNorm is the local layer.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

# Imported before init_process_group on purpose: torch.distributed.nn.functional, which
# DistributedDataParallel imports, binds the default process group into its argument
# defaults when first imported after the group exists. That keeps the group and its gloo
# workers alive into interpreter teardown, where a worker that still needs the GIL aborts
# the process ("terminate called without an active exception").
import torch.distributed.nn.functional
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from batchnorm.data import Split, load_requested_split
from batchnorm.modules.syncbn import SyncBatchNorm, convert_sync_batchnorm


def build_model(image_size: int = 28) -> nn.Module:
    """Two conv blocks with BatchNorm, then a linear classifier (square single-channel
    images of ``image_size`` pixels -> 10 classes)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (image_size // 4) ** 2, 10),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                        help="gloo on CPU (default), nccl on one GPU per process")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-images", type=int, default=None,
                        help="use only the first N training images (quick runs)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding mnist/ (default: $BATCHNORM_DATA, else "
                             "~/.cache/batchnorm; `batchnorm data fetch mnist` fills it)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a collective may wait before failing")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "train_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def _sum_over_processes(*values: float, device: torch.device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def _running_stats_spread(model: nn.Module, device: torch.device) -> float:
    """Largest difference of any BN running statistic between this process and rank 0."""
    stats = torch.cat([torch.cat([m.running_mean, m.running_var]) for m in model.modules()
                       if isinstance(m, SyncBatchNorm)]).to(device)
    if not dist.is_initialized():
        return 0.0
    reference = stats.clone()
    dist.broadcast(reference, src=0)
    spread = (stats - reference).abs().max()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return spread.item()


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, rank: int, world: int,
              device: torch.device) -> float:
    """Every process scores images rank, rank + world, ... (no padding), then sum."""
    model.eval()
    mine = slice(rank, None, world)
    predictions = model(images[mine].to(device)).argmax(1)
    correct = (predictions == labels[mine].to(device)).sum().item()
    correct, total = _sum_over_processes(correct, len(labels[mine]), device=device)
    return correct / total


def _load_data(data_dir: str | None, rank: int) -> Split | None:
    """The split (announced by rank 0), or None after one error line when the data asked
    for is not there."""
    try:
        split = load_requested_split(None, data_dir)
    except (FileNotFoundError, ValueError) as error:  # missing or corrupt files
        if rank == 0:
            print(f"ddp_mnist: error: {error}", file=sys.stderr)
        return None
    if split.note and rank == 0:
        print(f"note: {split.note}", flush=True)
    return split


def _train(args: argparse.Namespace, split: Split, rank: int, world: int,
           device: torch.device) -> None:
    """Train and report each epoch. The model lives only here: DistributedDataParallel's
    reducer holds the process group, and were it the last holder, freeing it would destroy
    the group while holding the GIL, which a gloo worker still releasing the last
    collective's tensors waits for (a hang). Released first, the group is destroyed by
    ``destroy_process_group``, which lets go of the GIL."""
    train_x, train_y = split.train_x[:args.train_images], split.train_y[:args.train_images]
    torch.manual_seed(0)
    model = convert_sync_batchnorm(build_model(train_x.shape[-1])).to(device)
    if world > 1:
        # No buffer broadcast from rank 0: SyncBatchNorm keeps the running statistics
        # equal on every process by itself, which the printed spread shows.
        model = DistributedDataParallel(model, broadcast_buffers=False)
    dataset = TensorDataset(train_x, train_y)
    sampler = DistributedSampler(dataset, world, rank, seed=0) if world > 1 else None
    loader = DataLoader(dataset, args.batch_size, shuffle=sampler is None, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"{split.name}: {len(train_x)} train / {len(split.val_y)} validation images,"
              f" {world} process(es), backend {args.backend if world > 1 else 'none'}, "
              f"batch {args.batch_size} per process", flush=True)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        loss_sum, seen = 0.0, 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(labels), seen + len(labels)
        loss_sum, seen = _sum_over_processes(loss_sum, seen, device=device)
        accuracy = _accuracy(model, split.val_x, split.val_y, rank, world, device)
        spread = _running_stats_spread(model, device)
        if rank == 0:
            print(f"epoch {epoch}: train loss {loss_sum / seen:.4f}  validation accuracy "
                  f"{accuracy:.2%}  BN running-stat spread across processes {spread:.1e}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    split = _load_data(args.data_dir, rank)  # before any process group: errors exit cleanly
    if split is None:
        return 2
    if world > 1:
        dist.init_process_group(args.backend,
                                timeout=datetime.timedelta(seconds=args.timeout))
    rank = dist.get_rank() if world > 1 else 0
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        _train(args, split, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
