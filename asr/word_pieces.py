"""Word-piece vocabularies: a sentencepiece unigram model whose pieces the network emits instead of characters.

A character model spells every word letter by letter, and without a language model a dropped letter is a wrong
word ("wil", "hav"); word pieces let it emit frequent words and their parts whole. Token 0 is the CTC blank (the
sentencepiece model's <unk> slot); a piece that begins a word starts with WORD_START. The sentencepiece model
travels inside model.json (base64), so a model folder stays one description and its weights.
"""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import ASRError
from .files import replaced_atomically
from .text import BLANK, Vocabulary, normalize_text

SENTENCEPIECE = "sentencepiece"
MAX_LINES = 1_000_000  # sentencepiece learns from a random sample of at most this many lines


class WordPieceError(ASRError, ValueError):
    """A word-piece model that cannot be built, read or used; names the file or the problem."""


def _processor(model: bytes):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model)
    except (RuntimeError, OSError) as e:
        raise WordPieceError(f"not a sentencepiece model ({e})") from None
    if processor.unk_id() != 0 or processor.bos_id() != -1 or processor.eos_id() != -1:
        raise WordPieceError("a sentencepiece model for CTC needs <unk> at id 0 (the blank's) and no <s> or </s> "
                             "(asr word-pieces builds one)")
    return processor


def _pieces(processor) -> list[str]:
    """A CTC vocabulary's tokens: the blank, then the pieces after <unk>."""
    return [BLANK] + [processor.id_to_piece(i) for i in range(1, processor.get_piece_size())]


@dataclass
class WordPieceVocabulary(Vocabulary):
    """The pieces of a sentencepiece model (`model`: its serialised bytes), with the blank at index 0."""

    model: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self._processor = _processor(self.model)
        if self.tokens != _pieces(self._processor):
            raise WordPieceError("the vocabulary's tokens are not its sentencepiece model's pieces")
        super().__post_init__()

    @classmethod
    def from_model(cls, model: bytes) -> WordPieceVocabulary:
        """The vocabulary of a serialised sentencepiece model."""
        return cls(_pieces(_processor(model)), model)

    @classmethod
    def from_file(cls, path: str | Path) -> WordPieceVocabulary:
        """The vocabulary of a sentencepiece model file (`asr word-pieces` writes one)."""
        try:
            return cls.from_model(Path(path).read_bytes())
        except OSError as e:
            raise WordPieceError(f"{path}: cannot read ({e.strerror or e})") from None
        except WordPieceError as e:
            raise WordPieceError(f"{path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        """Normalise `text` and map it to piece ids (what the pieces cannot spell dropped)."""
        return [i for i in self._processor.encode(normalize_text(text)) if i != 0]

    def spell_word(self, word: str) -> list[str] | None:
        ids = self._processor.encode(word) if word else [0]
        return None if 0 in ids else [self.tokens[i] for i in ids]

    def to_json(self) -> dict:
        """model.json's "tokenizer" entry."""
        return {"type": SENTENCEPIECE, "model": base64.b64encode(self.model).decode("ascii")}

    @classmethod
    def from_json(cls, entry: object, tokens: list[str]) -> WordPieceVocabulary:
        """The vocabulary of model.json's "tokenizer" entry and "vocabulary" tokens (WordPieceError if they are
        damaged or disagree)."""
        if not isinstance(entry, dict) or entry.get("type") != SENTENCEPIECE or not isinstance(entry.get("model"), str):
            raise WordPieceError(f'tokenizer must be {{"type": "{SENTENCEPIECE}", "model": base64}}')
        try:
            model = base64.b64decode(entry["model"], validate=True)
        except (binascii.Error, ValueError):
            raise WordPieceError("tokenizer.model is not base64") from None
        return cls(tokens, model)


def build_word_pieces(texts: Iterable[str], vocab_size: int, out: str | Path) -> WordPieceVocabulary:
    """Train a sentencepiece unigram model of `vocab_size` pieces (the blank included) on normalised `texts`,
    write it to `out` and return its vocabulary."""
    import sentencepiece

    lines = [t for t in (normalize_text(x) for x in texts) if t]
    if not lines:
        raise WordPieceError("no text to learn word pieces from")
    with tempfile.TemporaryDirectory(prefix="asr-pieces-") as tmp:
        corpus = Path(tmp) / "text.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            sentencepiece.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(Path(tmp) / "pieces"), vocab_size=vocab_size,
                model_type="unigram", character_coverage=1.0, normalization_rule_name="identity",
                unk_id=0, bos_id=-1, eos_id=-1, input_sentence_size=MAX_LINES, shuffle_input_sentence=True,
                minloglevel=2)
        except RuntimeError as e:
            most = re.search(r"value <= (\d+)", str(e))
            why = f"this text gives at most {most.group(1)}" if most else str(e)
            raise WordPieceError(f"cannot learn {vocab_size} word pieces from {len(lines):,} lines: {why}") from None
        model = (Path(tmp) / "pieces.model").read_bytes()
    vocab = WordPieceVocabulary.from_model(model)
    try:
        with replaced_atomically(out) as (tmp,):
            tmp.write_bytes(model)
    except OSError as e:
        raise WordPieceError(f"cannot write {out}: {e.strerror or e}") from None
    return vocab
