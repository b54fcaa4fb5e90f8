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


class Recorder:
    """A predictor that records the shape of every feed it is called with."""

    def __init__(self, inputs) -> None:
        self.inputs, self.outputs, self.seen = inputs, [], []

    def predict(self, feeds, outputs=None):
        self.seen.append(feeds["attention_mask"].shape)
        return {}


def _token_specs(seq: int = -1, batch: int = -1):
    from slimserve.server.runtimes.base import TensorSpec

    return [TensorSpec("input_ids", "INT64", (batch, seq)), TensorSpec("attention_mask", "INT64", (batch, seq))]


def test_a_text_model_is_timed_at_its_rows_real_lengths_as_served():
    """Each call cut to its rows' longest real length rounded up to 8 (what the server runs); similar lengths batched together."""
    from slimserve.optimizer.evaluation.measure import served_calls, timed_lengths
    from tests.token_models import token_rows

    rows = token_rows([3, 20, 9, 17, 5, 30], 128)
    one = served_calls(Recorder(_token_specs()), rows, 1)
    assert [c["attention_mask"].shape for c in one] == [(1, 8), (1, 24), (1, 16), (1, 24), (1, 8), (1, 32)]
    assert (one[1]["input_ids"] == rows["input_ids"][1:2, :24]).all()
    two = served_calls(Recorder(_token_specs()), rows, 2)
    assert [c["attention_mask"].shape for c in two] == [(2, 8), (2, 24), (2, 32)]  # lengths 3+5, 9+17, 20+30
    assert "3 calls" in timed_lengths(two) and timed_lengths(rows) is None
    # Served as sent: a fixed sequence length, a fixed batch, a mask that is not trailing padding, or nothing to cut.
    assert served_calls(Recorder(_token_specs(seq=128)), rows, 1) is None
    assert served_calls(Recorder(_token_specs(batch=1)), rows, 1) is None
    left = {k: v[:, ::-1].copy() for k, v in rows.items()}
    assert served_calls(Recorder(_token_specs()), left, 1) is None
    assert served_calls(Recorder(_token_specs()), token_rows([128, 128], 128), 1) is None
    assert served_calls(Recorder(_token_specs()), rows, 7) is None  # fewer rows than a batch: timed as before


def test_feeds_taken_in_turn_are_the_same_for_both_sides_of_a_ratio():
    """Rows of several lengths: every round times both predictors on the same rows, and every row is timed."""
    feeds = [{"attention_mask": np.ones((1, n), np.int64)} for n in (8, 16, 24, 32, 40, 48, 56)]
    a, b = Recorder([]), Recorder([])
    interleaved_ratio((a, feeds), (b, feeds), TimingOptions(ratio_seconds=0.05, warmup_calls=0, warmup_seconds=0, round_calls=3))
    assert a.seen == b.seen and len({s[1] for s in a.seen}) == 7
    c = Recorder([])
    times = time_until_tight(c, feeds, TimingOptions(min_calls=2, rel_ci=0.99, warmup_calls=0, warmup_seconds=0))
    assert len(times) >= 7 and {s[1] for s in c.seen} == {8, 16, 24, 32, 40, 48, 56}


def test_evaluate_times_a_padding_free_text_model_at_real_lengths(tmp_path):
    """The same rows padded to 128: a model with a free sequence axis is timed on the cut rows, and faster than at 128."""
    from slimserve.optimizer.base import Artifact
    from slimserve.optimizer.evaluation.measure import evaluate
    from slimserve.server.runtimes import RuntimeConfig, create_runtime
    from tests.token_models import token_model, token_rows

    path = token_model(tmp_path / "tokens.onnx")
    rows = token_rows([4, 6, 9, 12] * 8, 128)

    def factory(p, runtime):
        r = create_runtime(runtime, p, RuntimeConfig(intra_op_threads=1))
        r.load()
        return r

    e, _ = evaluate(Artifact(path, "onnx", "onnxruntime"), factory, rows, serving_batch=8, warmup=2, iterations=40)
    assert e.timed_lengths and "mean 12.0 positions" in e.timed_lengths  # 8, 8, 16, 16 in turn


STOPPED_CHILD = """
import sys, time
from slimserve.optimizer.evaluation.resumes import count_resumes
if sys.argv[1] == "count":  # first, as the worker does: before numpy starts its threads
    count_resumes()
from slimserve.optimizer.evaluation.timing import time_predict

class Busy:  # 20 ms of CPU a call: a stop lands inside calls
    def predict(self, feeds, outputs=None):
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass

print("ready", flush=True)
print(max(time_predict(Busy(), {}, 0, 60)), flush=True)
"""


@pytest.mark.parametrize("counted", [True, False])
def test_a_call_the_worker_was_stopped_in_is_timed_again(counted):
    """The job yield stops a worker (SIGSTOP ... SIGCONT) while serving is busy: with the worker's SIGCONT counter, no
    timed call carries the stop; without it, one does (what the variant's p99 showed before)."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", STOPPED_CHILD, "count" if counted else "plain"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        for _ in range(3):  # three stops of 0.3 s inside the 60 calls' ~1.2 s
            time.sleep(0.15)
            child.send_signal(signal.SIGSTOP)
            time.sleep(0.3)
            child.send_signal(signal.SIGCONT)
        longest = float(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    if counted:
        assert longest < 0.2
    else:
        assert longest > 0.25
