"""Batched greedy CTC decoding with word start/end times and confidences from the alignment."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .text import Vocabulary


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
            best_prob[b, positions].tolist(), vocab, frame_seconds, time_offset))
    return results


def words_from_emissions(chars: list[str], frames: list[int], probs: list[float], vocab: Vocabulary,
                         frame_seconds: float, time_offset: float = 0.0) -> Transcription:
    """Words, times and confidences from the characters a path emits, their frames and posteriors."""
    words: list[Word] = []
    current: list[tuple[str, int, float]] = []

    def flush() -> None:
        if current:
            text = "".join(c for c, _, _ in current)
            words.append(Word(text, round(time_offset + current[0][1] * frame_seconds, 3),
                              round(time_offset + (current[-1][1] + 1) * frame_seconds, 3),
                              round(sum(p for _, _, p in current) / len(current), 4)))
            current.clear()

    for c, f, p in zip(chars, frames, probs):
        if c == vocab.tokens[vocab.space]:
            flush()
        else:
            current.append((c, f, p))
    flush()
    return Transcription(" ".join(w.word for w in words), words)
