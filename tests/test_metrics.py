import pytest

from asr.metrics import error_rates, utterance_wer


def test_error_rates_normalise_before_scoring():
    rates = error_rates(["Hello, world!", "Two dogs"], ["hello world", "2 cats"])
    assert rates.words == 4 and rates.substitutions == 1 and rates.wer == pytest.approx(0.25)
    assert 0 < rates.cer < 0.5


def test_insertions_and_deletions():
    rates = error_rates(["a b c d"], ["a b d d e"])
    assert (rates.substitutions, rates.deletions, rates.insertions) == (1, 0, 1)
    assert rates.wer == pytest.approx(2 / 4)
    assert utterance_wer("a b", "") == 1.0
    assert utterance_wer("", "") == 0.0


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        error_rates(["a"], [])
