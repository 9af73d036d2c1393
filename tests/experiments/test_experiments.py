"""Each experiment end to end on its tiny configuration: the data it trains on, its
figures, its outputs, determinism and resume; and the full init-sweep on real MNIST."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import batchnorm
from batchnorm.data import load_split
from batchnorm.experiments import batch_size, init_sweep, mnist_mlp, norms, placement, update_ops
from batchnorm.experiments.base import run_experiment
from batchnorm.experiments.models import norm_layer
from batchnorm.experiments.registry import EXPERIMENTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_tiny_experiment_writes_results_figures_and_summary(name, digits, tmp_path):
    experiment = EXPERIMENTS[name]
    results = run_experiment(experiment, tmp_path, data=digits, seed=0, config=experiment.tiny,
                             progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results
    assert saved["experiment"] == name
    assert saved["config"] == json.loads(json.dumps(dataclasses.asdict(experiment.tiny)))
    figures = sorted(tmp_path.glob("*.png"))
    assert figures and all(f.read_bytes().startswith(PNG_MAGIC) for f in figures)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith(f"# {name}\n") and "|---|" in summary
    assert all(f"]({figure.name})" in summary for figure in figures)


TRAINING = [name for name, experiment in EXPERIMENTS.items() if experiment.needs_data]


def _rows(images: Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images.reshape(len(images), -1)}


@pytest.mark.parametrize("name", TRAINING)
def test_the_loop_trains_on_exactly_the_images_the_config_names(name, digits, tmp_path):
    """Every image a model sees in a training step (grad enabled, train mode) is one of
    the images the configuration names: the first ``train_size`` training images when
    the configuration has that field, else the whole training split; and an epoch-based
    run sees all of them (but the last partial batch)."""
    experiment = EXPERIMENTS[name]
    config = experiment.tiny
    named = getattr(config, "train_size", len(digits.train_x))
    seen: list[Tensor] = []
    planned = []

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if torch.is_grad_enabled() and module.training:
            seen.append(args[0].detach().clone())

    def build_recorded(build):
        model = build()
        model.register_forward_pre_hook(record)
        return model

    def runs(config, data, seed):
        planned.extend(experiment.runs(config, data, seed))
        return [dataclasses.replace(run, build=lambda build=run.build: build_recorded(build))
                for run in planned]

    run_experiment(dataclasses.replace(experiment, runs=runs), tmp_path, data=digits,
                   config=config, progress=False)
    allowed = _rows(digits.train_x[:named])
    trained = _rows(torch.cat(seen))
    assert trained <= allowed, f"{len(trained - allowed)} images outside the first {named}"
    if not any(run.replacement for run in planned):
        largest_batch = max(run.batch_size for run in planned)
        assert len(trained) > len(allowed) - largest_batch


@pytest.fixture
def figures(monkeypatch) -> Iterator[list[Figure]]:
    """Every figure the experiments save, kept open for inspection, closed afterwards."""
    close = plt.close
    kept: list[Figure] = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for figure in kept:
        close(figure)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_figure_is_titled_with_the_data_and_the_key_config(name, digits, tmp_path,
                                                                  figures):
    experiment = EXPERIMENTS[name]
    results = run_experiment(experiment, tmp_path, data=digits, config=experiment.tiny,
                             progress=False)
    assert figures
    for figure in figures:
        title = figure.get_suptitle()
        assert title.startswith(name) and f"seed {results['seed']}" in title
        if experiment.needs_data:
            assert " on digits: " in title
            assert f"{getattr(experiment.tiny, 'train_size', len(digits.train_x)):,}" in title


def test_init_sweep_legend_covers_no_axes(digits, tmp_path, figures):
    run_experiment(init_sweep.EXPERIMENT, tmp_path, data=digits, config=init_sweep.TINY,
                   progress=False)
    [figure] = figures
    renderer = figure.canvas.get_renderer()
    [legend] = figure.legends
    box = legend.get_window_extent(renderer)
    visible = [axis for axis in figure.axes if axis.get_visible()]
    assert visible and not any(axis.get_legend() for axis in visible)
    assert not any(box.overlaps(axis.get_window_extent(renderer)) for axis in visible)


def test_norms_figure_uses_more_channels_than_groups_so_groups_span_channels():
    config = norms.Config()
    n, c = config.shape[:2]
    assert 1 < config.groups < c
    ids = norms.group_ids(n, c, config.groups)["group"]
    for sample in ids:  # each group spans several channels of one sample
        assert len(set(sample.tolist())) == config.groups
    with pytest.raises(ValueError, match=r"groups must divide the 6 channels .* got 6"):
        norms.report(dataclasses.replace(norms.TINY, groups=6), {}, 0)


def test_same_seed_gives_a_byte_identical_results_json(digits, tmp_path):
    runs = {}
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_experiment(init_sweep.EXPERIMENT, tmp_path / folder, data=digits, seed=seed,
                       config=init_sweep.TINY, progress=False)
        runs[folder] = (tmp_path / folder / "results.json").read_bytes()
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("experiment, stop_after", [(init_sweep.EXPERIMENT, 2),
                                                    (update_ops.EXPERIMENT, 3)])
def test_interrupted_experiment_resumes_to_the_same_results_json(experiment, stop_after,
                                                                 digits, tmp_path):
    run_experiment(experiment, tmp_path / "whole", data=digits, config=experiment.tiny,
                   progress=False)

    def interrupt(name: str, records: int) -> None:
        calls.append((name, records))
        if len(calls) == stop_after:
            raise Interrupted

    calls: list[tuple[str, int]] = []
    with pytest.raises(Interrupted):
        run_experiment(experiment, tmp_path / "resumed", data=digits, config=experiment.tiny,
                       progress=False, on_record=interrupt)
    assert not (tmp_path / "resumed" / "results.json").exists()
    interrupted_at = calls[-1]
    calls.clear()
    run_experiment(experiment, tmp_path / "resumed", data=digits, config=experiment.tiny,
                   progress=False, on_record=lambda *call: calls.append(call))
    assert calls[0] != ("bn", 1) and calls[0] != interrupted_at  # went on, not over
    assert ((tmp_path / "resumed" / "results.json").read_bytes()
            == (tmp_path / "whole" / "results.json").read_bytes())


def test_init_sweep_sweeps_16_scales_from_1_to_1e_minus_4_for_20_records():
    config = init_sweep.Config()
    np.testing.assert_allclose(config.scales, np.logspace(0, -4, 16), rtol=1e-15)
    assert (config.hidden, config.train_size, config.batch_size, config.learning_rate,
            config.records, config.steps_per_record) == ((100,) * 5, 1000, 100, 0.01, 20, 10)


def test_init_sweep_results_hold_one_curve_per_scale_and_variant(digits, tmp_path):
    results = run_experiment(init_sweep.EXPERIMENT, tmp_path, data=digits,
                             config=init_sweep.TINY, progress=False)
    assert results["scales"] == list(init_sweep.TINY.scales)
    for variant in ("bn", "no_bn"):
        curves = results["curves"][variant]
        assert len(curves) == len(init_sweep.TINY.scales)
        assert all(len(curve) == init_sweep.TINY.records for curve in curves)
        assert all(0.0 <= value <= 1.0 for curve in curves for value in curve)


def test_init_sweep_rejects_a_train_size_larger_than_the_data(digits):
    config = dataclasses.replace(init_sweep.TINY, train_size=len(digits.train_x) + 1)
    with pytest.raises(ValueError, match=r"train_size must be in \[1, 1437\] for digits, "
                                         r"got 1438"):
        init_sweep.runs(config, digits, 0)


def test_mnist_mlp_has_bn_before_each_elu_and_on_the_logits_with_tf_settings(digits):
    bn_run, no_bn_run = mnist_mlp.runs(mnist_mlp.Config(), digits, 0)
    layers = [type(m).__name__ for m in bn_run.build()]
    assert layers == ["Flatten", "Linear", "BatchNorm1d", "ELU", "Linear", "BatchNorm1d", "ELU",
                      "Linear", "BatchNorm1d"]
    norm = bn_run.build()[2]
    assert (norm.momentum, norm.eps) == pytest.approx((0.1, 1e-3))
    assert "BatchNorm1d" not in [type(m).__name__ for m in no_bn_run.build()]
    assert bn_run.batch_size == 200 and bn_run.records == 20
    assert bn_run.steps_per_record == len(digits.train_x) // 200


def test_update_ops_never_updated_run_keeps_the_initial_statistics(digits):
    updated, never_updated = update_ops.runs(update_ops.TINY, digits, 0)
    for run, changes in ((updated, True), (never_updated, False)):
        model = run.build().train()
        norms_ = [m for m in model if isinstance(m, batchnorm.BatchNorm1d)]
        model(digits.train_x[:32])
        for norm in norms_:
            unchanged = (torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
                         and torch.equal(norm.running_var, torch.ones_like(norm.running_var)))
            assert unchanged != changes


def test_placement_puts_bn_after_the_activation_in_the_after_runs(digits):
    runs = {run.name: run for run in placement.runs(placement.TINY, digits, 0)}
    before = [type(m).__name__ for m in runs["sigmoid/before"].build()]
    after = [type(m).__name__ for m in runs["sigmoid/after"].build()]
    assert before[1:4] == ["Linear", "BatchNorm1d", "Sigmoid"]
    assert after[1:4] == ["Linear", "Sigmoid", "BatchNorm1d"]


def test_batch_size_scales_the_learning_rate_linearly_with_the_batch(digits):
    runs = {run.name: run for run in batch_size.runs(batch_size.TINY, digits, 0)}
    lr = {size: runs[f"gn/{size}"].optimizer([torch.nn.Parameter(torch.zeros(1))])
          .param_groups[0]["lr"] for size in batch_size.TINY.batch_sizes}
    assert lr[8] == pytest.approx(4 * lr[2])


@pytest.mark.parametrize("method, expected", [
    ("bn", "BatchNorm2d"), ("renorm", "BatchNorm2d"), ("ghost", "BatchNorm2d"),
    ("gn", "GroupNorm"), ("ln", "LayerNorm"), ("in", "InstanceNorm2d")])
def test_norm_layer_builds_our_layer_for_each_method(method, expected):
    layer = norm_layer(method, 8, spatial=(5, 5), groups=4)
    assert type(layer).__name__ == expected and type(layer).__module__.startswith("batchnorm")
    assert layer(torch.randn(3, 8, 5, 5)).shape == (3, 8, 5, 5)


def test_unknown_norm_method_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"method must be one of .*'bn'.*got 'batch'"):
        norm_layer("batch", 8)


def test_norms_finds_c_n_n_times_c_and_n_times_g_groups_and_running_means_of_0_05(tmp_path):
    results = run_experiment(norms.EXPERIMENT, tmp_path, progress=False)
    groups = {name: check["groups"] for name, check in results["methods"].items()}
    assert groups == {"batch": 6, "layer": 4, "instance": 24, "group": 4 * norms.Config().groups}
    assert all(check["ok"] and check["max_abs_error"] < norms.TOLERANCE
               for check in results["methods"].values())
    running = results["running_mean"]
    assert running["ok"] and abs(running["mean"] - 0.05) < 1e-3


def test_experiment_that_trains_requires_data(tmp_path):
    with pytest.raises(ValueError, match="data must be a loaded split, got None"):
        run_experiment(init_sweep.EXPERIMENT, tmp_path, progress=False)


@pytest.mark.mnist
def test_init_sweep_on_mnist_bn_beats_no_bn_at_12_or_more_of_16_scales(mnist_data_dir, tmp_path):
    data = load_split("mnist", data_dir=mnist_data_dir, fallback=False)
    results = run_experiment(init_sweep.EXPERIMENT, tmp_path, data=data, progress=False)
    rows = init_sweep.final_accuracies(results)
    assert len(rows) == 16
    wins = sum(bn > no_bn for _, bn, no_bn in rows)
    assert wins >= 12, rows
    # the book's picture: where its network reaches 0.99-1.0 (w = 0.025 down to 0.004),
    # so does ours, trained and scored on the same first 1,000 images
    assert all(bn >= 0.98 for scale, bn, _ in rows if 0.0039 <= scale <= 0.026), rows


def test_renorm_and_ghost_methods_turn_on_the_variant_options():
    renorm = norm_layer("renorm", 8, spatial=(5, 5))
    ghost = norm_layer("ghost", 8, spatial=(5, 5), ghost_batch_size=4)
    plain = norm_layer("bn", 8, spatial=(5, 5))
    assert renorm.renorm and not plain.renorm and renorm.renorm_clipping == {"rmax": 3.0,
                                                                               "dmax": 5.0}
    assert ghost.ghost_batch_size == 4 and plain.ghost_batch_size is None


def test_outputs_are_never_written_through_links_planted_in_out(digits, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    names = ("results.json", "summary.md", "init_sweep.png")
    for name in names:
        (out / f"{name}.tmp").symlink_to(target)  # the old fixed temporary names
        (out / name).symlink_to(target)
    results = run_experiment(init_sweep.EXPERIMENT, out, data=digits, config=init_sweep.TINY,
                             progress=False)
    assert target.read_text() == "precious"
    assert json.loads((out / "results.json").read_text()) == results
    assert not any((out / name).is_symlink() for name in names)
    assert (out / "init_sweep.png").read_bytes().startswith(PNG_MAGIC)
