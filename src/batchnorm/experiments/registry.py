"""Every experiment by name, in the order ``batchnorm experiment list`` prints them."""

from __future__ import annotations

from batchnorm.experiments import (
    batch_size,
    init_sweep,
    mnist_mlp,
    norms,
    placement,
    recalibrate,
    update_ops,
)
from batchnorm.experiments.base import Experiment

EXPERIMENTS: dict[str, Experiment] = {
    module.EXPERIMENT.name: module.EXPERIMENT
    for module in (init_sweep, mnist_mlp, update_ops, placement, batch_size, norms,
                   recalibrate)
}
