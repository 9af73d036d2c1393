"""``batchnorm demo``: init-sweep, then the figure path and one row per weight scale."""

from __future__ import annotations

import dataclasses

from batchnorm import demo
from batchnorm.experiments import init_sweep


def test_demo_prints_the_figure_path_and_a_row_per_scale(tmp_path, capsys, monkeypatch):
    quick = dataclasses.replace(init_sweep.Config(), hidden=(8,), train_size=100, records=2,
                                steps_per_record=2)
    monkeypatch.setattr(init_sweep, "EXPERIMENT",
                        dataclasses.replace(init_sweep.EXPERIMENT, config=quick))
    assert demo.main(["--dataset", "digits", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    figure = tmp_path / "init_sweep.png"
    assert f"figure: {figure}" in out and figure.is_file()
    header = out.splitlines().index(f"{'weight scale':>12}  {'BN':>6}  {'no BN':>6}")
    rows = out.splitlines()[header + 1:header + 17]
    assert [float(row.split()[0]) for row in rows] == [float(f"{s:.3g}") for s in quick.scales]
    assert all(0.0 <= float(value) <= 1.0 for row in rows for value in row.split()[1:])
