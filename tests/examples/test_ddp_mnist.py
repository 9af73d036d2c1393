"""The DDP + SyncBatchNorm example under torchrun with 2 gloo processes: on real MNIST,
and on a fresh clone without MNIST, where it falls back to the bundled digits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm.examples.ddp_mnist import main, parse_args


@pytest.mark.mnist
def test_torchrun_two_processes_learns_and_keeps_running_stats_in_sync(
        mnist_data_dir: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "batchnorm.examples.ddp_mnist", "--epochs", "2",
               "--train-images", "2000", "--timeout", "60"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "BATCHNORM_DATA": str(mnist_data_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = re.findall(r"epoch (\d): train loss ([\d.]+)  validation accuracy ([\d.]+)%  "
                        r"BN running-stat spread across processes ([\d.e+-]+)", result.stdout)
    assert [int(epoch) for epoch, *_ in epochs] == [1, 2], result.stdout
    assert float(epochs[-1][2]) > 80.0, result.stdout  # chance is 10%
    assert all(float(spread) == 0.0 for *_, spread in epochs), result.stdout
    assert "2 process(es), backend gloo" in result.stdout


def test_readme_command_without_mnist_trains_on_the_digits_and_says_so(empty_home: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "batchnorm.examples.ddp_mnist", "--epochs", "1",
               "--timeout", "60"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    mnist = empty_home / ".cache/batchnorm/mnist"
    assert result.stdout.startswith(f"note: no MNIST under {mnist}, so the bundled 8x8 digits "
                                    "are used instead")
    assert "digits: 1437 train / 360 validation images, 2 process(es)" in result.stdout
    assert "epoch 1: train loss" in result.stdout


# Run by each torchrun process. When the example destroys its process group: the gloo
# worker threads (so the name check below can fail) and the DDP models still alive (one
# holds the group: freeing it after would destroy the group holding the GIL, which a gloo
# worker may wait for). After main(): the gloo threads still alive.
_TEARDOWN_REPORT = """
import gc, os, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from batchnorm.examples import ddp_mnist

def gloo_threads():
    names = (open(f"/proc/self/task/{task}/comm").read().strip()
             for task in os.listdir("/proc/self/task"))
    return sorted(name for name in names if "gloo" in name)

destroy = dist.destroy_process_group
def destroy_and_report(*args, **kwargs):
    models = sum(isinstance(item, DistributedDataParallel) for item in gc.get_objects())
    print(f"rank {os.environ['RANK']} at destroy: {models} DDP models, {gloo_threads()}",
          flush=True)
    destroy(*args, **kwargs)
dist.destroy_process_group = destroy_and_report
code = ddp_mnist.main(sys.argv[1:])
print(f"rank {os.environ['RANK']} after main: {gloo_threads()}", flush=True)
sys.exit(code)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_the_process_group_is_destroyed_after_the_model_and_before_teardown(
        tmp_path: Path, empty_home: Path) -> None:
    """Either order mistake fails now and then, after training succeeded: a group kept into
    interpreter teardown aborts the process ("terminate called without an active
    exception"), one destroyed by freeing the DDP model can hang."""
    script = tmp_path / "teardown_report.py"
    script.write_text(_TEARDOWN_REPORT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), "--epochs", "1", "--train-images", "128",
               "--timeout", "60"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        at_destroy = re.search(rf"rank {rank} at destroy: (\d+) DDP models, (.*)",
                               result.stdout)
        assert at_destroy and "pt_gloo_runloop" in at_destroy[2], result.stdout
        assert at_destroy[1] == "0", result.stdout
        assert f"rank {rank} after main: []" in result.stdout, result.stdout


def test_a_data_dir_without_mnist_stops_with_one_line_saying_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data-dir", str(tmp_path / "nothing")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"ddp_mnist: error: mnist not found under {tmp_path / 'nothing'}")
    assert f"`batchnorm data fetch mnist --data-dir {tmp_path / 'nothing'}` downloads it" in line


@pytest.mark.parametrize("option", ["--epochs", "--batch-size", "--train-images"])
def test_non_positive_sizes_are_rejected_naming_the_option(
        option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args([option, "0"])
    assert f"{option} must be at least 1, got 0" in capsys.readouterr().err
