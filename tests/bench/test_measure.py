"""The bench's timing rules on synthetic rounds: when a ratio is reported as a measurement
and when its row is flagged unsteady (rounds that disagree, a busy CPU, a compile during
timing), interleaving, and torch.compile finished before the timed rounds."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from torch import nn

from batchnorm.bench import measure


def test_load_that_slows_both_competitors_in_a_round_leaves_the_ratio_steady():
    ours = [1.0, 3.0, 1.0, 2.0, 1.0]
    baseline = [2 * t for t in ours]
    result = measure.compare(baseline, ours, margin=0.15)
    assert result["ratio"] == pytest.approx(2.0)
    assert result["spread"] == pytest.approx(0.0)
    assert result["steady"] and result["unsteady_because"] == []


def test_a_baseline_slowed_in_some_rounds_only_is_flagged_not_reported():
    # The CLI issue's case: something else ran during some of the baseline's rounds.
    ours = [1.0] * 5
    baseline = [75.0, 1.0, 75.0, 1.0, 75.0]
    result = measure.compare(baseline, ours, margin=0.15)
    assert not result["steady"]
    assert (result["low"], result["high"]) == (1.0, 75.0)
    assert result["unsteady_because"] == [
        f"per-round ratios spread {result['spread']:.0%} > 15%"]


def test_one_outlier_round_in_fifteen_does_not_flag_the_row():
    ours = [1.0] * 15
    baseline = [1.5] * 14 + [9.0]
    result = measure.compare(baseline, ours, margin=0.15)
    assert result["steady"] and result["ratio"] == pytest.approx(1.5)
    assert result["high"] == 9.0


@pytest.mark.parametrize(("baseline", "steady"), [
    ([1.0, 1.1, 1.2], True),    # interquartile range 0.1 over median 1.1: 9 %
    ([1.0, 1.2, 1.4], False),   # 0.2 over 1.2: 17 %
])
def test_the_margin_bounds_the_interquartile_range_over_the_median(baseline, steady):
    assert measure.compare(baseline, [1.0] * 3, margin=0.15)["steady"] is steady


def test_a_spread_needs_paired_rounds_and_at_least_two_of_them():
    with pytest.raises(ValueError, match="at least 2 rounds, got 1"):
        measure.relative_spread([1.0])
    with pytest.raises(ValueError, match="3 baseline rounds, 2 of ours"):
        measure.compare([1.0] * 3, [1.0] * 2)


def _rounds(cpu_wait: float | None = 0.0, graphs: int = 0) -> measure.Rounds:
    return measure.Rounds({"baseline": [2.0, 2.0, 2.0], "ours": [1.0, 1.0, 1.0]},
                          load_1min=0.5, cpu_wait=cpu_wait, graphs_compiled=graphs)


def test_agreeing_rounds_on_a_busy_cpu_are_flagged_with_the_reason():
    limits = measure.Limits(margin=0.15, max_cpu_wait=0.1)
    assert _rounds(cpu_wait=0.05).compare("baseline", "ours", limits)["steady"]
    assert _rounds(cpu_wait=None).compare("baseline", "ours", limits)["steady"]
    busy = _rounds(cpu_wait=0.5).compare("baseline", "ours", limits)
    assert busy["ratio"] == pytest.approx(2.0) and not busy["steady"]
    assert busy["unsteady_because"] == ["CPU wait 50% > 10%"]


def test_a_compile_during_the_timed_rounds_flags_the_row():
    result = _rounds(graphs=1).compare("baseline", "ours", measure.Limits())
    assert not result["steady"]
    assert result["unsteady_because"] == ["1 graph(s) compiled while timing"]


def test_a_competitor_that_did_not_run_has_no_ratio_and_no_time():
    rounds = _rounds()
    assert rounds.compare("compile", "ours", measure.Limits()) is None
    assert rounds.ms("compile") is None and rounds.ms("ours") == pytest.approx(1e3)


def test_rounds_interleave_the_competitors_after_the_warmup():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timed = measure.interleaved_rounds(steps, rounds=3, warmup=2, min_round_s=0)
    assert calls == ["a", "b", "c"] * 5
    assert {name: len(seconds) for name, seconds in timed.seconds.items()} == \
        {"a": 3, "b": 3, "c": 3}
    assert timed.graphs_compiled == 0


def test_a_round_repeats_a_short_call_to_fill_the_minimum_round_time():
    calls = []
    measure.interleaved_rounds({"short": lambda: calls.append(1)}, rounds=2, warmup=0,
                               min_round_s=0.002)
    assert len(calls) > 2 * 10  # one calibration call plus many per round


def test_the_thread_count_is_set_for_a_row_and_restored_after():
    before = torch.get_num_threads()
    with measure.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def _linear_step(compiler: measure.Compiler, features: int = 4) -> measure.Step:
    model = compiler.compile(nn.Linear(features, 3))
    x = torch.randn(2, features)
    return lambda: model(x).sum().backward()


def test_warmed_up_compiled_steps_compile_nothing_while_timed():
    compiler = measure.Compiler(budget_s=120, backend="eager")
    steps, notes = compiler.warm_up({"compiled": lambda: _linear_step(compiler)})
    assert notes["compiled"].startswith("compiled in ")
    timed = measure.interleaved_rounds(steps, rounds=3, warmup=0, min_round_s=0)
    assert timed.graphs_compiled == 0
    # Control: a step not warmed up (new shapes) compiles inside the timed rounds.
    cold = measure.Compiler(budget_s=120, backend="eager")
    cold_timed = measure.interleaved_rounds({"cold": _linear_step(cold, features=5)},
                                            rounds=3, warmup=0, min_round_s=0)
    assert cold_timed.graphs_compiled > 0


def test_compile_notes_say_why_a_step_did_not_compile():
    def failing() -> measure.Step:
        raise RuntimeError("backend exploded\nsecond line")

    _, notes = measure.Compiler(budget_s=60, backend="eager").warm_up({"x": failing})
    assert notes == {"x": "n/a (RuntimeError: backend exploded)"}
    _, notes = measure.Compiler(budget_s=None).warm_up({"x": failing})
    assert notes == {"x": "n/a (--no-compile)"}
    spent = measure.Compiler(budget_s=0.0)
    assert spent.warm_up({"x": failing}) == ({}, {"x": "n/a (compile time budget spent)"})


def test_time_limit_holds_when_the_alarm_is_swallowed():
    """The alarm can land where Python ignores exceptions (a weakref callback); leaving the
    block late still raises, so a compile never runs past its budget unnoticed."""
    with (pytest.raises(measure.CompileTimeout, match="longer than"),
          measure.time_limit(0.05),
          contextlib.suppress(measure.CompileTimeout)):  # what a swallowing callback does
        time.sleep(0.3)


def test_time_limit_lets_a_quick_block_through():
    with measure.time_limit(5):
        value = sum(range(10))
    assert value == 45
