"""Decoder options (the one place they are defined), the decoder interface, and batched greedy CTC decoding
with word start/end times and confidences from the alignment. Beam search is in lm/beam_search.py."""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import torch

from .errors import OptionsError
from .text import Vocabulary, spell_token, starts_word

DECODERS = ("greedy", "beam")


@dataclass
class DecodingOptions:
    """How CTC posteriors become text. A model folder's decoder.json holds its tuned beam values and its default
    decoder; the CLI, `transcribe(**options)`, tuning and the benches replace fields of the model's `decoding`
    with theirs."""

    decoder: str = "greedy"  # "greedy" (best path) or "beam" (beam search, with the model's LM when it has one)
    beam_size: int = 50  # hypotheses kept per frame
    beam_size_token: int | None = 3  # most likely tokens tried per frame (None: all)
    beam_threshold: float = 10.0  # drop hypotheses this far (log) below the best
    lm_weight: float = 0.5  # alpha: weight of the LM's log10-probability
    word_score: float = 0.0  # beta: bonus per word (counters the LM's preference for few words)
    blank_penalty: float = 0.0  # beam search: taken from the blank's log-probability (fewer dropped letters)
    unk_score: float = -math.inf  # score of words outside the lexicon (lexicon search)
    lexicon: bool = True  # spell only known words (needs an LM); False: any spelling, no word LM
    hotwords: list[str] = field(default_factory=list)  # words or phrases to favour at this call
    hotword_weight: float = 8.0  # added to the LM log10-probability of each hot word (before alpha)

    def __post_init__(self) -> None:
        if isinstance(self.hotwords, str):
            self.hotwords = [self.hotwords]  # one phrase, not a list of its letters
        problems = []
        if not isinstance(self.hotwords, (list, tuple)) or not all(isinstance(h, str) for h in self.hotwords):
            problems.append(f"hotwords must be a phrase or a list of phrases, not {self.hotwords!r}")
        else:
            self.hotwords = list(self.hotwords)
        if self.decoder not in DECODERS:
            problems.append(f"decoder must be one of {', '.join(map(repr, DECODERS))}, not {self.decoder!r}")
        if not (isinstance(self.beam_size, int) and self.beam_size >= 1):
            problems.append(f"beam_size must be a whole number >= 1, not {self.beam_size!r}")
        token = self.beam_size_token
        if token is not None and not (isinstance(token, int) and token >= 1):
            problems.append(f"beam_size_token must be a whole number >= 1 or None, not {self.beam_size_token!r}")
        penalty = self.blank_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
            problems.append(f"blank_penalty must be a finite number, not {penalty!r}")
        if problems:
            raise OptionsError("; ".join(problems))

    def beam_settings(self) -> dict:
        """The fields that configure a beam search (everything but the decoder's name)."""
        return {k: v for k, v in asdict(self).items() if k != "decoder"}


def unknown_option(name: str, known: list[str], what: str) -> OptionsError:
    """An error for an option name that is not one of `known`, suggesting the close ones."""
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else f"; known: {', '.join(known)}"
    return OptionsError(f"unknown {what} option {name!r}{hint}")


DECODING_FIELDS = [f.name for f in fields(DecodingOptions)]


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float
    confidence: float  # mean posterior of the word's emitted characters, in [0, 1]


@dataclass
class Transcription:
    text: str
    words: list[Word] = field(default_factory=list)
    duration: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def end_words_by(self, seconds: float) -> None:
        """Move word times past `seconds` (the audio's end) to it: a one-way model may spell the last word out
        in its end silence."""
        for w in self.words:
            w.start, w.end = min(w.start, seconds), min(w.end, seconds)


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, vocab: Vocabulary,
                  frame_seconds: float, time_offset: float = 0.0) -> list[Transcription]:
    """Best path per utterance: argmax per frame (on the device), collapse repeats, drop blanks.

    log_probs: (batch, frames, vocab); lengths: (batch,) valid frames. A word starts at the frame of
    its first character and ends one frame after the frame of its last.
    """
    best_prob, best = log_probs.max(-1)
    best_prob = best_prob.exp()
    frames = torch.arange(best.shape[1], device=best.device)
    prev = torch.nn.functional.pad(best[:, :-1], (1, 0), value=vocab.blank)
    emit = (best != vocab.blank) & (best != prev) & (frames[None, :] < lengths.to(best.device)[:, None])
    emit, best, best_prob = emit.cpu(), best.cpu(), best_prob.float().cpu()
    results = []
    for b in range(best.shape[0]):
        positions = emit[b].nonzero().squeeze(1).tolist()
        results.append(words_from_emissions(
            [vocab.tokens[i] for i in best[b, positions].tolist()], positions,
            best_prob[b, positions].tolist(), frame_seconds, time_offset))
    return results


EARLY_FRAMES = 2  # letters on the input's first frames ...
EARLY_GAP_SECONDS = 0.25  # ... that the rest of their word follows only this much later are timed with the rest


def without_early_emissions(tokens: list[str], frames: list[int], frame_seconds: float) -> list[int]:
    """The frames of a path's emissions, those of tokens on the input's first EARLY_FRAMES moved to the frame
    before the next token of their word when that comes more than EARLY_GAP_SECONDS later.

    A bidirectional CTC model sees the whole utterance, and may spell its first letters on the first frames,
    whatever silence comes before the speech (the shipped English model does on 894 of 1,260 speechocean762 dev
    utterances, and spells the rest of the word about 0.6 s later): the first word would start at 0 s. A word
    spelled whole on the first frames stays there (the speech check drops it when no speech is under it)."""
    early = 0
    while early < len(frames) and frames[early] < EARLY_FRAMES:
        early += 1
    if (0 < early < len(frames) and tokens[0] != " " and not any(starts_word(t) for t in tokens[1: early + 1])
            and (frames[early] - frames[early - 1]) * frame_seconds > EARLY_GAP_SECONDS):
        return [frames[early] - 1] * early + list(frames[early:])
    return list(frames)


def words_from_emissions(tokens: list[str], frames: list[int], probs: list[float], frame_seconds: float,
                         time_offset: float = 0.0) -> Transcription:
    """Words, times and confidences from the tokens a path emits (characters, spaces or word pieces), their frames
    and posteriors (tokens on the first frames whose word goes on after a silence are timed with it:
    `without_early_emissions`). A word's confidence is the mean posterior of its tokens."""
    frames = without_early_emissions(tokens, frames, frame_seconds)
    words: list[Word] = []
    current: list[tuple[str, int, float]] = []

    def flush() -> None:
        if current:
            text = "".join(c for c, _, _ in current)
            words.append(Word(text, round(time_offset + current[0][1] * frame_seconds, 3),
                              round(time_offset + (current[-1][1] + 1) * frame_seconds, 3),
                              round(sum(p for _, _, p in current) / len(current), 4)))
            current.clear()

    for token, f, p in zip(tokens, frames, probs):
        if starts_word(token):
            flush()
        letters = spell_token(token).strip()
        if letters:
            current.append((letters, f, p))
    flush()
    return Transcription(" ".join(w.word for w in words), words)


class Decoder(Protocol):
    """What every decoder does: CTC log-probabilities (batch, frames, vocab) and valid frame counts -> text."""

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor, frame_seconds: float,
               time_offset: float = 0.0) -> list[Transcription]: ...


class GreedyDecoder:
    """Best-path decoding as a Decoder."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor, frame_seconds: float,
               time_offset: float = 0.0) -> list[Transcription]:
        return greedy_decode(log_probs, lengths, self.vocab, frame_seconds, time_offset)
