"""Where in a recording there may be speech: frames loud enough and not noise-like.

A CTC model normalises each utterance, so digital silence, a hiss at -90 dBFS or white noise look to
it like loud, strange speech, and it spells something. This check keeps it honest: a word is kept
only where the audio has frames that are above an absolute level and whose spectrum is not flat
(white noise has a flat spectrum; voiced speech has harmonics and formants). Hum, music or a second
talker pass the check; those are for the model to handle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .audio import SAMPLE_RATE
from .decoding import Transcription

SPEECH_HOP = SAMPLE_RATE // 100  # samples between frames: 10 ms
SPEECH_WINDOW = SAMPLE_RATE * 25 // 1000  # 25 ms frames
_FRAMES_AT_ONCE = 6000  # bounds the memory of the spectra, whatever the length


@dataclass
class SpeechActivityOptions:
    min_level_dbfs: float = -65.0  # frames quieter than this (RMS) are silence
    max_flatness: float = 0.4  # spectral flatness (0 tonal .. ~0.56 white noise) above this is noise
    min_speech_seconds: float = 0.03  # a word needs this much speech-like audio within its span
    word_margin_seconds: float = 0.1  # CTC emits a word's characters near, not exactly on, its sound


def speech_frames(wave: torch.Tensor, options: SpeechActivityOptions | None = None) -> torch.Tensor:
    """A bool per 10 ms frame (frame i centred on sample i * SPEECH_HOP) of 16 kHz mono audio: may it be speech?"""
    opts = options or SpeechActivityOptions()
    hop, win = SPEECH_HOP, SPEECH_WINDOW
    wave = wave.detach().float().cpu()
    if len(wave) < win:
        wave = torch.nn.functional.pad(wave, (0, win - len(wave)))
    frames = torch.nn.functional.pad(wave, (win // 2, win // 2)).unfold(0, win, hop)  # (frames, win), a view
    n_fft = 1 << (win - 1).bit_length()
    low, high = round(125 * n_fft / SAMPLE_RATE), round(4000 * n_fft / SAMPLE_RATE) + 1  # voiced speech's band
    window = torch.hann_window(win)
    active = []
    for part in frames.split(_FRAMES_AT_ONCE):
        level = 10 * torch.log10(part.pow(2).mean(1) + 1e-20)
        band = torch.fft.rfft(part * window, n_fft).abs().pow(2)[:, low:high] + 1e-20
        flatness = band.log().mean(1).exp() / band.mean(1)
        active.append((level >= opts.min_level_dbfs) & (flatness <= opts.max_flatness))
    return torch.cat(active)


def keep_spoken_words(result: Transcription, speech: torch.Tensor, options: SpeechActivityOptions | None = None,
                      lookback_seconds: float = 0.0) -> Transcription:
    """Drop the words whose span (with a margin) holds less than `min_speech_seconds` of speech-like frames.

    `lookback_seconds` reaches each span further back: how late after its sound the model may spell a word (a
    one-way model's end silence, ModelConfig.end_silence_ms)."""
    opts = options or SpeechActivityOptions()
    cumulative = torch.cat([torch.zeros(1, dtype=torch.long), speech.long().cumsum(0)])
    hop_seconds = SPEECH_HOP / SAMPLE_RATE
    needed = max(1, round(opts.min_speech_seconds / hop_seconds))

    def spoken(start: float, end: float) -> bool:
        first = max(0, int((start - opts.word_margin_seconds - lookback_seconds) / hop_seconds))
        last = min(len(speech), int((end + opts.word_margin_seconds) / hop_seconds) + 1)
        return last > first and int(cumulative[last] - cumulative[first]) >= needed

    words = [w for w in result.words if spoken(w.start, w.end)]
    if len(words) == len(result.words):
        return result
    return Transcription(" ".join(w.word for w in words), words, result.duration)
