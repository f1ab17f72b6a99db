import pytest

from asr.text import BLANK, Vocabulary, normalize_text


@pytest.mark.parametrize("raw, expected", [
    ("Hello, World!", "hello world"),
    ("  MANY   spaces\tand\nlines ", "many spaces and lines"),
    ("I've got 2 dogs.", "i've got two dogs"),
    ("It’s the 21st century", "it's the twenty first century"),
    ("1,000 people & 3.5 cats", "one thousand people and three point five cats"),
    ("'quoted' words' end", "quoted words end"),
    ("well-known café", "well known cafe"),
    ("50% off", "fifty percent off"),
    ("", ""),
    ("?!.", ""),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_vocabulary_round_trip():
    vocab = Vocabulary()
    assert vocab.tokens[0] == BLANK and len(vocab) == 29
    ids = vocab.encode("Don't PANIC, 42!")
    assert vocab.blank not in ids
    assert vocab.decode(ids) == "don't panic forty two"


def test_vocabulary_rejects_bad_tokens():
    with pytest.raises(ValueError, match="blank"):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        Vocabulary([BLANK, "a", "a"])
