"""Tests for optimizer/evaluation/timing.py: timing stops once the median or the ratio is known, or at its time cap."""

from __future__ import annotations

import time

import numpy as np
import pytest

from slimserve.optimizer.base import ConfigValueError
from slimserve.optimizer.evaluation.timing import TimingOptions, interleaved_ratio, median_ci, time_until_tight


class Sleeper:
    """A predictor whose call sleeps `seconds` (the wall time a model of that cost takes)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def predict(self, feeds, outputs=None):
        self.calls += 1
        time.sleep(self.seconds)
        return {}


def test_the_median_interval_narrows_with_steady_calls():
    rng = np.random.default_rng(0)
    steady = 0.010 + 0.0001 * rng.standard_normal(100)
    noisy = 0.010 + 0.004 * rng.standard_normal(100)
    assert median_ci(steady) < 0.01 < median_ci(noisy)
    assert median_ci(steady[:2]) == float("inf")


def test_timing_stops_at_its_time_cap_on_a_slow_model():
    """A 50 ms call: min_calls calls after one warm-up call, then the time cap ends it (not 200 calls, 10 s)."""
    slow = Sleeper(0.05)
    options = TimingOptions(max_seconds=0.3, warmup_seconds=0.0, rel_ci=0.0001)
    started = time.perf_counter()
    times = time_until_tight(slow, {}, options)
    assert 5 <= len(times) <= 8 and time.perf_counter() - started < 1.0
    assert slow.calls == len(times) + 1  # one warm-up call: its time cap is 0


def test_timing_stops_once_the_median_is_known():
    options = TimingOptions(max_seconds=30, rel_ci=0.2, min_calls=5)
    times = time_until_tight(Sleeper(0.002), {}, options)
    assert 5 <= len(times) < 200 and median_ci(times) <= 0.2


def test_the_ratio_is_timed_in_turns_with_its_interval():
    fast, slow = Sleeper(0.002), Sleeper(0.004)
    ratio = interleaved_ratio((fast, {}), (slow, {}), TimingOptions(ratio_seconds=3.0, rel_ci=0.05, warmup_calls=1, round_calls=3))
    assert ratio.rounds >= 3 and ratio.low <= ratio.speedup <= ratio.high
    assert 1.4 < ratio.speedup < 2.6  # 2x, on a shared machine
    assert fast.calls == slow.calls  # the same calls each, in turns


def test_timing_settings_are_checked():
    with pytest.raises(ConfigValueError, match="rel_ci must be between 0 and 1"):
        TimingOptions(rel_ci=2)
    with pytest.raises(ConfigValueError, match="min_calls <= max_calls"):
        TimingOptions(min_calls=10, max_calls=5)


def test_a_recipe_file_sets_its_timing():
    from slimserve.optimizer.base import OptimizerError
    from slimserve.optimizer.recipes import recipe_from_dict

    recipe = recipe_from_dict({"passes": [{"pass": "graph-ort"}], "timing": {"max_seconds": 2, "rel_ci": 0.05}}, "r.json")
    assert recipe.timing == TimingOptions(max_seconds=2.0, rel_ci=0.05)
    assert recipe.to_dict()["timing"]["max_seconds"] == 2.0
    assert "timing" not in recipe_from_dict({"passes": [{"pass": "graph-ort"}]}, "r.json").to_dict()
    with pytest.raises(OptimizerError, match=r"r.json timing: unknown setting 'seconds'"):
        recipe_from_dict({"passes": [{"pass": "graph-ort"}], "timing": {"seconds": 2}}, "r.json")
    with pytest.raises(OptimizerError, match=r"r.json timing: timing rel_ci must be between 0 and 1"):
        recipe_from_dict({"passes": [{"pass": "graph-ort"}], "timing": {"rel_ci": 5}}, "r.json")
