"""Word and character error rates (jiwer) over normalised text."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jiwer

from .text import normalize_text


@dataclass
class ErrorRates:
    wer: float
    cer: float
    words: int
    substitutions: int
    deletions: int
    insertions: int
    chars: int
    char_errors: int

    def to_dict(self) -> dict:
        return asdict(self)


def error_rates(references: list[str], hypotheses: list[str]) -> ErrorRates:
    """Corpus-level WER and CER after the shared normaliser. Empty references are skipped."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        raise ValueError("no non-empty references to score")
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    n_words = words.hits + words.substitutions + words.deletions
    n_chars = chars.hits + chars.substitutions + chars.deletions
    char_errors = chars.substitutions + chars.deletions + chars.insertions
    return ErrorRates(wer=words.wer, cer=chars.cer, words=n_words, substitutions=words.substitutions,
                      deletions=words.deletions, insertions=words.insertions, chars=n_chars,
                      char_errors=char_errors)


def utterance_wer(reference: str, hypothesis: str) -> float:
    """WER of one utterance (normalised); 0 for an empty reference with an empty hypothesis."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return 0.0 if not hyp else float(len(hyp.split()))
    return jiwer.wer(ref, hyp)
