"""Waveform augmentation: speed, pitch, coloured noise, babble, room reverberation, microphone colouring,
telephone channel, lossy re-encoding, level and leading silence.

Used on the fly by the training Dataset (random draws from torch's RNG, which is seeded per loader
worker and restored on resume) and baked into synthetic corpora (a `torch.Generator` seeded per file,
so a file's augmentation does not depend on the order of work). Filters and resampling are torchaudio's.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

CODECS = (("OGG", "OPUS"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III"))


@dataclass
class AugmentOptions:
    """Which augmentations apply and how strongly. A `*_prob` is the share of utterances that get it."""

    speed_perturb: list[float] = field(default_factory=list)  # factors drawn uniformly, e.g. [0.9, 1.0, 1.1]
    pitch_semitones: list[float] = field(default_factory=list)  # [min, max] shift, tempo kept, e.g. [-2, 4]
    pitch_prob: float = 0.5
    noise_snr_db: list[float] = field(default_factory=list)  # [min, max], e.g. [10, 40]; empty: no noise
    noise_prob: float = 0.5
    noise_exponent: list[float] = field(default_factory=lambda: [-2.0, 1.0])  # colour: power ~ f**x, x in range
    babble_prob: float = 0.0  # other utterances talking underneath (needs a source of other speech)
    babble_talkers: list[int] = field(default_factory=lambda: [2, 5])  # [min, max] talkers
    babble_snr_db: list[float] = field(default_factory=lambda: [5.0, 25.0])
    reverb_prob: float = 0.0  # a synthetic room: exponentially decaying noise tail
    reverb_rt60: list[float] = field(default_factory=lambda: [0.15, 0.8])  # seconds for the tail to fall 60 dB
    eq_prob: float = 0.0  # microphone/channel colouring: random peaking filters and shelves
    eq_gain_db: float = 10.0  # each filter's gain is drawn from [-eq_gain_db, eq_gain_db]
    telephone_prob: float = 0.0  # 8 kHz, 300-3400 Hz band, 8-bit mu-law
    codec_prob: float = 0.0  # re-encoded as Opus, Vorbis or MP3 at a random compression level
    gain_db: list[float] = field(default_factory=list)  # [min, max]: the recording's level, last (e.g. [-30, 6])
    # [min, max] ms of silence before the speech, first: a stream does not start where the speech does (FSDD
    # clips do: a one-way model trained on them alone learns to spell a word at the first frames, heard or not)
    lead_silence_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("pitch_semitones", "noise_snr_db", "noise_exponent", "babble_talkers", "babble_snr_db",
                     "reverb_rt60", "gain_db", "lead_silence_ms"):
            value = getattr(self, name)
            if value and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"{name} is a [min, max] range, got {value}")
        if self.lead_silence_ms and not 0 <= self.lead_silence_ms[0] <= self.lead_silence_ms[1] <= 60_000:
            raise ValueError(f"lead_silence_ms is a [min, max] range within 0 and 60000, got {self.lead_silence_ms}")
        if len(self.noise_exponent) != 2:
            raise ValueError("noise_exponent is a [min, max] range (-2 brown ... 0 white ... 1 blue)")
        if self.pitch_semitones and not -12 <= self.pitch_semitones[0] <= self.pitch_semitones[1] <= 12:
            raise ValueError(f"pitch_semitones is a [min, max] range within -12 and 12, got {self.pitch_semitones}")
        for name in ("pitch_prob", "noise_prob", "babble_prob", "reverb_prob", "eq_prob", "telephone_prob",
                     "codec_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return bool(self.speed_perturb or (self.pitch_semitones and self.pitch_prob)
                    or (self.noise_snr_db and self.noise_prob) or self.babble_prob
                    or self.reverb_prob or self.eq_prob or self.telephone_prob or self.codec_prob or self.gain_db
                    or self.lead_silence_ms)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def coloured_noise(samples: int, exponent: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit-variance noise whose power goes as f**exponent: -2 brown, -1 pink, 0 white, 1 blue."""
    spectrum = torch.fft.rfft(torch.randn(samples, generator=generator))
    freqs = torch.arange(1, len(spectrum) + 1, dtype=torch.float32)
    noise = torch.fft.irfft(spectrum * freqs ** (exponent / 2), n=samples)
    return noise / noise.std().clamp_min(1e-8)


def mix_at_snr(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """`wave` plus `noise` (tiled or cut to its length) scaled to the given signal-to-noise ratio."""
    if len(noise) < len(wave):
        noise = noise.repeat(math.ceil(len(wave) / max(1, len(noise))))
    return AF.add_noise(wave[None], noise[None, : len(wave)], torch.tensor([float(snr_db)]))[0]


def babble(talkers: list[torch.Tensor], samples: int) -> torch.Tensor:
    """The sum of several utterances, each at equal level, tiled or cut to `samples`."""
    mixed = torch.zeros(samples)
    for t in talkers:
        t = t / t.pow(2).mean().sqrt().clamp_min(1e-8)
        mixed += t.repeat(math.ceil(samples / max(1, len(t))))[:samples]
    return mixed


def room_impulse_response(rt60: float, sample_rate: int, generator: torch.Generator | None = None
                          ) -> torch.Tensor:
    """A direct path followed by a diffuse tail of noise falling 60 dB over `rt60` seconds."""
    n = max(2, int(rt60 * sample_rate))
    t = torch.arange(n, dtype=torch.float32) / sample_rate
    tail = torch.randn(n, generator=generator) * torch.exp(-6.9078 * t / rt60)  # ln(1000): 60 dB in amplitude
    onset = int(0.003 * sample_rate)  # the first reflections arrive a few ms after the direct sound
    tail[:onset] = 0.0
    rir = tail * 0.3
    rir[0] = 1.0
    return rir / rir.norm()


def reverberate(wave: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Convolve with a room impulse response, keeping length and loudness."""
    wet = AF.fftconvolve(wave, rir)[: len(wave)]
    return wet * (wave.pow(2).mean().sqrt() / wet.pow(2).mean().sqrt().clamp_min(1e-8))


def shift_pitch(wave: torch.Tensor, sample_rate: int, semitones: float, n_fft: int = 512) -> torch.Tensor:
    """The waveform's pitch and formants moved by about `semitones` (to the nearest 200 Hz of resampling rate, which
    keeps torchaudio's resampling fast), its length kept: time-stretched by the phase vocoder, then resampled."""
    read_at = max(200, round(sample_rate * 2 ** (semitones / 12) / 200) * 200)
    rate = sample_rate / read_at  # below 1 when raising the pitch: stretch longer first
    hop, window = n_fft // 4, torch.hann_window(n_fft, device=wave.device)
    spec = torch.stft(wave, n_fft, hop, window=window, return_complex=True)
    advance = torch.linspace(0, math.pi * hop, spec.shape[-2], device=wave.device)[:, None]
    stretched = torch.istft(AF.phase_vocoder(spec, rate, advance), n_fft, hop, window=window,
                            length=round(len(wave) / rate))
    out = AF.resample(stretched, read_at, sample_rate)
    return torch.nn.functional.pad(out, (0, max(0, len(wave) - len(out))))[: len(wave)]


def colour(wave: torch.Tensor, sample_rate: int, gain_db: float, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """A random microphone/channel: 1-3 peaking filters, a bass and a treble shelf, gains within ±gain_db."""
    def draw(low: float, high: float) -> float:
        return _uniform(low, high, generator)

    nyquist = sample_rate / 2
    for _ in range(1 + int(torch.randint(3, (), generator=generator))):
        centre = math.exp(draw(math.log(150.0), math.log(0.8 * nyquist)))
        wave = AF.equalizer_biquad(wave, sample_rate, centre, draw(-gain_db, gain_db), Q=draw(0.5, 2.0))
    wave = AF.bass_biquad(wave, sample_rate, draw(-gain_db, gain_db) / 2, central_freq=200.0)
    wave = AF.treble_biquad(wave, sample_rate, draw(-gain_db, gain_db) / 2, central_freq=min(3000.0, 0.6 * nyquist))
    return wave


def telephone(wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """A narrow-band telephone channel: 8 kHz, 300-3400 Hz, 8-bit mu-law, back at `sample_rate`."""
    narrow = AF.resample(wave, sample_rate, 8000) if sample_rate != 8000 else wave
    narrow = AF.lowpass_biquad(AF.highpass_biquad(narrow, 8000, 300.0), 8000, 3400.0)
    peak = narrow.abs().max().clamp_min(1e-8)
    narrow = AF.mu_law_decoding(AF.mu_law_encoding(narrow / peak, 256), 256) * peak
    return AF.resample(narrow, 8000, sample_rate) if sample_rate != 8000 else narrow


def reencode(wave: torch.Tensor, sample_rate: int, codec: tuple[str, str], compression: float) -> torch.Tensor:
    """Encode with a lossy codec in memory (libsndfile) and decode again; compression in [0, 1]."""
    buffer = io.BytesIO()
    peak = float(wave.abs().max())
    data = (wave / peak * 0.9 if peak > 0.9 else wave).numpy().astype(np.float32)
    sf.write(buffer, data, sample_rate, format=codec[0], subtype=codec[1], compression_level=compression)
    buffer.seek(0)
    decoded, _ = sf.read(buffer, dtype="float32")
    out = torch.from_numpy(decoded.reshape(-1))
    out = torch.nn.functional.pad(out, (0, max(0, len(wave) - len(out))))[: len(wave)]  # codecs pad frames
    return out * (peak / 0.9) if peak > 0.9 else out


class Augmenter:
    """Applies AugmentOptions to a waveform: leading silence, speed, pitch, colouring, reverb, telephone, codec, then
    noise, babble, gain.

    `babble_source()` returns one random other utterance (16 kHz waveform) when babble is wanted.
    Without a generator the draws come from torch's global RNG.
    """

    def __init__(self, options: AugmentOptions, sample_rate: int,
                 babble_source: Callable[[], torch.Tensor] | None = None):
        self.options = options
        self.sample_rate = sample_rate
        self.babble_source = babble_source

    def __call__(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        o, sr = self.options, self.sample_rate

        def chance(p: float) -> bool:
            return p > 0 and _uniform(0.0, 1.0, generator) < p

        def uniform(low: float, high: float) -> float:
            return _uniform(low, high, generator)

        if o.lead_silence_ms:
            wave = torch.cat([wave.new_zeros(round(uniform(*o.lead_silence_ms) * sr / 1000)), wave])
        if o.speed_perturb:
            factor = o.speed_perturb[int(torch.randint(len(o.speed_perturb), (), generator=generator))]
            if factor != 1.0:  # resampling to rate/factor then playing at rate speeds up by factor
                wave = AF.resample(wave, int(round(sr * factor)), sr)
        if o.pitch_semitones and len(wave) > 512 and chance(o.pitch_prob):
            wave = shift_pitch(wave, sr, uniform(*o.pitch_semitones))
        if chance(o.eq_prob):
            wave = colour(wave, sr, o.eq_gain_db, generator)
        if chance(o.reverb_prob):
            wave = reverberate(wave, room_impulse_response(uniform(*o.reverb_rt60), sr, generator))
        if chance(o.telephone_prob):
            wave = telephone(wave, sr)
        if chance(o.codec_prob):
            codec = CODECS[int(torch.randint(len(CODECS), (), generator=generator))]
            wave = reencode(wave, sr, codec, uniform(0.3, 1.0))
        if o.noise_snr_db and chance(o.noise_prob):
            noise = coloured_noise(len(wave), uniform(*o.noise_exponent), generator)
            wave = mix_at_snr(wave, noise, uniform(*o.noise_snr_db))
        if self.babble_source is not None and chance(o.babble_prob):
            count = int(torch.randint(o.babble_talkers[0], o.babble_talkers[1] + 1, (), generator=generator))
            wave = mix_at_snr(wave, babble([self.babble_source() for _ in range(count)], len(wave)),
                              uniform(*o.babble_snr_db))
        if o.gain_db:
            wave = AF.gain(wave, uniform(*o.gain_db))
        peak = float(wave.abs().max()) if len(wave) else 0.0
        return wave / peak * 0.99 if peak > 1.0 else wave
