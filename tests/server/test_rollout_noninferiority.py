"""The non-inferiority SPRTs of the rollout gates (server/rollout/sequential.py, issue 24): a variant exactly at the
margin (the hardest null) or past it passes at most alpha of the time when looked at after every batch, up to and
including the truncation's one look; an equal variant passes, sooner than a fixed-sample test's sample. Seeded
simulations, few runs: a false-pass rate far above alpha fails them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimserve.server.errors import InvalidArgument
from slimserve.server.rollout.sequential import (
    TRUNCATE_AT,
    fixed_information,
    noninferior_proportion,
    noninferior_quantile,
    noninferior_rate,
    rate_sprt,
)

ALPHA = 0.1  # large, so that 300 runs measure it
RUNS = 300
MARGIN = 0.01


def _rate_runs(rng, p_canary: float, p_control: float, batch: int = 100, control_per_canary: int = 19):
    """(pass share, fail share, canary requests at each decision) over RUNS runs looked at every `batch` canary requests."""
    passes = fails = 0
    when = []
    for _ in range(RUNS):
        e1 = e0 = n1 = 0
        while True:
            e1 += int(rng.binomial(batch, p_canary))
            e0 += int(rng.binomial(batch * control_per_canary, p_control))
            n1 += batch
            t = rate_sprt(e1, n1, e0, n1 * control_per_canary, MARGIN, ALPHA / 10, ALPHA)
            if t.decision != "continue":
                passes += t.decision == "pass"
                fails += t.decision == "fail"
                when.append(n1)
                break
    return passes / RUNS, fails / RUNS, when


def test_the_error_sprt_passes_a_variant_at_or_past_the_margin_at_most_alpha_of_the_time():
    rng = np.random.default_rng(24)
    at_margin, _, _ = _rate_runs(rng, 0.02, 0.01)
    past, _, _ = _rate_runs(rng, 0.025, 0.01)
    assert at_margin <= ALPHA and past <= ALPHA / 2, (at_margin, past)


def test_the_error_sprt_passes_an_equal_variant_in_fewer_requests_than_the_fixed_sample_test():
    rng = np.random.default_rng(7)
    passed, _, when = _rate_runs(rng, 0.01, 0.01)
    # the one-sided fixed-sample test at the same alpha with 90% power, its variance at the null (rates 2% and 1%) as the
    # SPRT's pass: (z_alpha sd_null + z_beta sd_equal)^2 / margin^2 canary requests
    z = math.sqrt(fixed_information(1.0, ALPHA)) / 2  # z_alpha = z_0.9 = 1.28 at alpha 0.1
    sd_null, sd_equal = math.sqrt(0.02 * 0.98 + 0.01 * 0.99 / 19), math.sqrt(0.01 * 0.99 * (1 + 1 / 19))
    fixed_n = (z * sd_null + z * sd_equal) ** 2 / MARGIN**2
    assert passed >= 0.9 and np.median(when) < fixed_n, (passed, np.median(when), fixed_n)


def test_the_sprt_is_truncated_at_its_maximum_information_with_a_decision():
    # exactly in the middle of the continuation region, past the maximum: the one fixed-sample look decides
    n = 2_000_000
    t = rate_sprt(int(n * 0.015), n, int(n * 0.01), n, MARGIN, ALPHA / 10, ALPHA)
    assert t.information >= t.max_information == pytest.approx(TRUNCATE_AT * fixed_information(MARGIN, ALPHA))
    assert t.decision in ("pass", "fail")
    small = rate_sprt(3, 200, 20, 2000, MARGIN, ALPHA / 10, ALPHA)
    assert small.decision == "continue" and small.information < small.max_information


def test_the_agreement_sprt_is_exact_at_the_minimum_and_passes_a_good_shadow():
    rng = np.random.default_rng(3)

    def runs(p: float) -> float:
        passed = 0
        for _ in range(RUNS):
            hits = trials = 0
            while True:
                hits += int(rng.binomial(50, p))
                trials += 50
                v = noninferior_proportion(hits, trials, 0.95, ALPHA / 10, alpha_pass=ALPHA)
                if v.decision != "continue":
                    passed += v.decision == "pass"
                    break
        return passed / RUNS

    assert runs(0.95) <= ALPHA
    assert runs(0.99) >= 0.95


def test_the_latency_pass_keeps_alpha_at_exactly_the_allowed_ratio():
    rng = np.random.default_rng(5)
    passes = 0
    for _ in range(60):
        canary, control = np.empty(0), np.empty(0)
        for _ in range(10):  # 10 looks of 150 canary and 1350 control requests
            canary = np.concatenate([canary, rng.lognormal(0, 0.5, 150) * 1.2])
            control = np.concatenate([control, rng.lognormal(0, 0.5, 1350)])
            v = noninferior_quantile(canary, control, 0.5, 1.2, ALPHA / 10, alpha_pass=ALPHA)
            if v.decision != "continue":
                passes += v.decision == "pass"
                break
    assert passes / 60 <= ALPHA
    fast = noninferior_quantile(rng.lognormal(0, 0.5, 1500), rng.lognormal(0, 0.5, 15000), 0.5, 1.2, ALPHA / 10, alpha_pass=ALPHA)
    assert fast.decision == "pass" and "non-inferiority" in fast.evidence


def test_verdicts_say_what_they_saw_and_bad_parameters_are_invalid_arguments():
    v = noninferior_rate((10, 2000), (190, 38000), MARGIN, 0.005, alpha_pass=0.05)
    assert v.decision == "pass" and v.threshold == MARGIN and "10/2000" in v.evidence and "SPRT" in v.evidence
    assert noninferior_rate((80, 2000), (380, 38000), MARGIN, 0.005).decision == "fail"
    for bad in (
        lambda: rate_sprt(1, 10, 1, 10, 1.5, 0.05),
        lambda: rate_sprt(1, 10, 1, 10, 0.01, 0.0),
        lambda: noninferior_rate((1, 10), (1, 10), 0.01, 0.05, alpha_pass=2.0),
        lambda: noninferior_proportion(1, 10, 1.2, 0.05),
        lambda: noninferior_quantile(np.ones(3), np.ones(3), 0.5, 0.9, 0.05),
    ):
        with pytest.raises(InvalidArgument, match=r"out of range|must be"):
            bad()
