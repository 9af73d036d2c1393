"""The DDP + SyncBatchNorm example under torchrun with 2 gloo processes on real MNIST."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm.examples.ddp_mnist import parse_args


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


@pytest.mark.parametrize("option", ["--epochs", "--batch-size", "--train-images"])
def test_non_positive_sizes_are_rejected_naming_the_option(
        option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args([option, "0"])
    assert f"{option} must be at least 1, got 0" in capsys.readouterr().err
