"""Tests for bench/bench_students.py's text: unlabelled English from packages on disk, none of it an evaluation sentence."""

from __future__ import annotations

from bench.bench_quantize import SENTENCES
from bench.bench_students import _sentences, unlabelled_text


def test_the_train_text_is_distinct_prose_from_packages_and_never_an_eval_sentence():
    text, sources = unlabelled_text(60, {SENTENCES[0]})
    assert len(text) == 60 == len(set(text)) and sources == "pydoc_data 60"
    assert not set(text) & set(SENTENCES)
    assert all(40 < len(s) < 300 and s[0].isupper() for s in text)


def test_code_and_markup_are_not_taken_as_sentences():
    found = _sentences("The parser reads a line of input and returns it. x = f(y) is code. Short one. A `literal` here is markup.")
    assert found == ["The parser reads a line of input and returns it."]


def test_the_curve_fit_recovers_a_power_law_and_says_never_when_the_gap_does_not_shrink():
    from bench.bench_students import fit_curve

    runs = [{"variant": "s", "sentences": n, "cosine": 1 - 0.2 * (n / 400) ** -0.5} for n in (400, 1600, 6400)]
    runs += [{"variant": "flat", "sentences": n, "cosine": c} for n, c in ((400, 0.9), (1600, 0.89))]
    fit = fit_curve(runs)
    assert fit["s"]["gap_exponent"] == 0.5 and fit["s"]["max_log_residual"] == 0.0
    assert fit["s"]["sentences_for_0.99"] == 160000.0  # 0.2 * (n / 400) ** -0.5 = 0.01 at n = 400 * 20 ** 2
    assert fit["s"]["gain_per_4x"] == 0.025  # the last gap 0.05 halves
    assert fit["flat"]["sentences_for_0.99"] is None and fit["flat"]["gain_per_4x"] == 0.0
