"""English text: the one normaliser shared by training and scoring, and the character vocabulary
(word-piece vocabularies: word_pieces.py)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from num2words import num2words

BLANK = "<blank>"
WORD_START = "\u2581"  # a word piece that begins a word starts with this mark (sentencepiece's)
ENGLISH_CHARACTERS = [BLANK, " ", "'", *"abcdefghijklmnopqrstuvwxyz"]

_SYMBOL_WORDS = {"&": " and ", "%": " percent ", "+": " plus ", "@": " at ", "=": " equals "}
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b")
_DECIMAL = re.compile(r"\b\d+\.\d+\b")
_NUMBER = re.compile(r"\d+")
_APOSTROPHES = re.compile(r"[\u2018\u2019\u02bc`´]")
_NOT_ALLOWED = re.compile(r"[^a-z' ]+")
_EDGE_APOSTROPHE = re.compile(r"(?<![a-z])'|'(?![a-z])")
_SPACES = re.compile(r"\s+")


def _spell(match: re.Match[str], **kwargs: object) -> str:
    return " " + num2words(match.group(0) if not kwargs else match.group(1), **kwargs) + " "


def normalize_text(text: str) -> str:
    """Lower-case English words made of a-z and in-word apostrophes, single-spaced.

    Numbers are spelled out ("21st" -> "twenty first", "3.5" -> "three point five"),
    a few symbols become words, accents are stripped and other punctuation is removed.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _APOSTROPHES.sub("'", text).lower()
    for symbol, word in _SYMBOL_WORDS.items():
        text = text.replace(symbol, word)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = _ORDINAL.sub(lambda m: _spell(m, to="ordinal"), text)
    text = _DECIMAL.sub(_spell, text)
    text = _NUMBER.sub(_spell, text)
    text = text.replace("-", " ")
    text = _NOT_ALLOWED.sub(" ", text)
    text = _EDGE_APOSTROPHE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


@dataclass
class Vocabulary:
    """Characters the model emits; index 0 is the CTC blank."""

    tokens: list[str] = field(default_factory=lambda: list(ENGLISH_CHARACTERS))

    def __post_init__(self) -> None:
        if not self.tokens or self.tokens[0] != BLANK:
            raise ValueError(f"the first token must be the CTC blank {BLANK!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")
        self._index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def blank(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        """Normalise `text` and map it to token ids (characters outside the vocabulary dropped)."""
        return [self._index[c] for c in normalize_text(text) if c in self._index]

    def decode(self, ids: list[int]) -> str:
        """Map ids to text (no CTC collapsing here; blanks are skipped)."""
        return " ".join("".join(spell_token(self.tokens[i]) for i in ids if i != self.blank).split())

    def spell_word(self, word: str) -> list[str] | None:
        """The tokens that spell one normalised word, or None when the vocabulary cannot spell it."""
        return list(word) if word and all(c in self._index for c in word) else None


def starts_word(token: str) -> bool:
    """Whether an emitted token begins a new word: a space (characters) or a piece marked WORD_START."""
    return token == " " or token.startswith(WORD_START)


def spell_token(token: str) -> str:
    """The letters a token adds to its word, with a word start written as a space."""
    return " " + token[1:] if token.startswith(WORD_START) else token
