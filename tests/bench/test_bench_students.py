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
