"""Log-mel features, their normalisation and SpecAugment, computed as a module on the model's device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
import torchaudio.transforms as T
from torch import nn

from .audio import SAMPLE_RATE

NORMALIZATIONS = ("per_utterance", "per_utterance_level", "global", "running_level", "none")
CAUSAL_NORMALIZATIONS = ("running_level", "global", "none")  # each frame normalised without the frames after it
GLOBAL_STATISTICS = ("global", "running_level")  # normalisations that use the training set's mean and std
# settings that act in training only (augmentation): they may change when a run starts from another's weights
TRAINING_ONLY_KEYS = ("freq_masks", "freq_mask_width", "time_masks", "time_mask_width", "time_mask_max_ratio",
                      "vtlp_warp", "vtlp_boundary_hz")


def check_number(key: str, value: object, low: float, high: float, integer: bool = False,
                 above_low: bool = False) -> None:
    """Raise ValueError starting with `key` unless `value` is a number (an int if `integer`) within the bounds.

    The range is [low, high], or (low, high] with `above_low`; NaN is never within it.
    """
    kinds = (int,) if integer else (int, float)
    inside = isinstance(value, kinds) and not isinstance(value, bool) and (
        (low < value if above_low else low <= value) and value <= high)
    if not inside:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{key}: must be {kind} {'>' if above_low else '>='} {low} and <= {high}, got {value!r}")


@dataclass
class FeatureConfig:
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512
    f_min: float = 0.0
    f_max: float | None = None  # None: half the sample rate; 4000 suits telephone / 8 kHz corpora
    # "per_utterance": each mel band to zero mean, unit variance over the utterance (removes channel
    # colouring, but on very short utterances also much of the vowel's own spectrum);
    # "per_utterance_level": one mean and variance over all bands and frames (removes only gain);
    # "global": training-set statistics per band; "running_level": "global" after removing the difference
    # between the level so far (the mean log-mel of the last level_window_ms, level_prior_ms of it at the
    # training set's level) and the training set's level: a causal per_utterance_level; "none"
    normalization: str = "per_utterance"
    level_window_ms: float = 3000.0
    level_prior_ms: float = 200.0
    # SpecAugment (torchaudio masking), active in training mode only
    freq_masks: int = 2
    freq_mask_width: int = 27
    time_masks: int = 2
    time_mask_width: int = 40
    time_mask_max_ratio: float = 0.1
    # vocal tract length perturbation, in training only: each utterance's frequencies scaled by a factor drawn
    # from this [min, max] range (e.g. [0.9, 1.1]; above 1 moves the formants up, as a shorter vocal tract
    # does), straight up to vtlp_boundary_hz * min(factor, 1) and then on a line that keeps the Nyquist frequency
    vtlp_warp: list[float] = field(default_factory=list)
    vtlp_boundary_hz: float = 4800.0

    def __post_init__(self) -> None:
        """Check every value (a model.json or a configuration may hold anything); errors name the key."""
        check_number("n_mels", self.n_mels, 1, 512, integer=True)
        check_number("n_fft", self.n_fft, 8, 32768, integer=True)
        check_number("win_ms", self.win_ms, 0, 1000, above_low=True)
        check_number("hop_ms", self.hop_ms, 0, 1000, above_low=True)
        if self.hop_length < 1:
            raise ValueError(f"hop_ms: {self.hop_ms} ms is less than one sample at {SAMPLE_RATE} Hz")
        if self.win_length > self.n_fft:
            raise ValueError(f"win_ms: a {self.win_ms} ms window ({self.win_length} samples) is longer than "
                             f"n_fft={self.n_fft}")
        check_number("f_min", self.f_min, 0, SAMPLE_RATE / 2)
        if self.f_max is not None:
            check_number("f_max", self.f_max, self.f_min, SAMPLE_RATE / 2, above_low=True)
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization: must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        for key in ("freq_masks", "time_masks"):
            check_number(key, getattr(self, key), 0, 100, integer=True)
        check_number("freq_mask_width", self.freq_mask_width, 0, 512, integer=True)
        check_number("time_mask_width", self.time_mask_width, 0, 100_000, integer=True)
        check_number("time_mask_max_ratio", self.time_mask_max_ratio, 0, 1)
        check_number("level_window_ms", self.level_window_ms, 0, 3_600_000, above_low=True)
        check_number("level_prior_ms", self.level_prior_ms, 0, 3_600_000)
        if self.vtlp_warp and (len(self.vtlp_warp) != 2 or not 0.5 <= self.vtlp_warp[0] <= self.vtlp_warp[1] <= 2):
            raise ValueError(f"vtlp_warp: a [min, max] range of factors within 0.5 and 2, got {self.vtlp_warp}")
        check_number("vtlp_boundary_hz", self.vtlp_boundary_hz, 0, SAMPLE_RATE / 2, above_low=True)

    @property
    def hop_length(self) -> int:
        return int(round(SAMPLE_RATE * self.hop_ms / 1000))

    @property
    def win_length(self) -> int:
        return int(round(SAMPLE_RATE * self.win_ms / 1000))

    @property
    def level_window_frames(self) -> int:
        return max(1, round(self.level_window_ms / self.hop_ms))


def running_level(levels: torch.Tensor, window: int, prior_frames: float, prior: torch.Tensor,
                  history: torch.Tensor | None = None) -> torch.Tensor:
    """Each frame's level so far: the mean of the frame levels (batch, frames) over the last `window` frames
    (its own included) and `prior_frames` frames at level `prior` in front. `history` (batch, < window): the
    levels of the frames just before (a stream's), as if they led `levels` in one sequence."""
    before = 0 if history is None else history.shape[1]
    seq = levels if history is None else torch.cat([history, levels], 1)
    sums = F.pad(seq.double().cumsum(1), (1, 0))  # sums[:, t]: the first t frames (float64: exact enough for hours)
    end = torch.arange(before + 1, seq.shape[1] + 1, device=levels.device)
    start = (end - window).clamp_min(0)
    counts = (end - start).double()
    return ((sums[:, end] - sums[:, start] + prior_frames * prior.double()) / (counts + prior_frames)).to(levels.dtype)


def warped_filterbanks(filterbank: torch.Tensor, factors: torch.Tensor, boundary_hz: float,
                       sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Vocal tract length perturbation (Jaitly & Hinton, 2013): a mel filterbank (freq_bins, n_mels) turned into
    one per factor (batch, freq_bins, n_mels) that reads the spectrum with its frequencies scaled by the factor.

    Warped bin f takes the power at w^-1(f) (linearly interpolated between bins), where w(g) = factor * g up to
    g = boundary_hz * min(factor, 1) / factor and then runs straight to the Nyquist frequency, which stays."""
    bins = filterbank.shape[0]
    nyquist = sample_rate / 2
    freqs = torch.linspace(0, nyquist, bins, device=filterbank.device, dtype=torch.float64)[None, :]
    factor = factors.to(freqs)[:, None]
    knee = boundary_hz * factor.clamp(max=1.0)  # w(knee / factor) = knee
    above = nyquist - (nyquist - freqs) * (nyquist - knee / factor) / (nyquist - knee)
    source = torch.where(freqs <= knee, freqs / factor, above) / nyquist * (bins - 1)  # (batch, bins), in bins
    low = source.floor().clamp(0, bins - 1)
    frac = (source - low).to(filterbank.dtype)
    low = low.long()
    high = (low + 1).clamp(max=bins - 1)
    warp = torch.zeros(len(factors), bins, bins, device=filterbank.device, dtype=filterbank.dtype)
    warp.scatter_add_(2, low[..., None], (1 - frac)[..., None])  # warp[b, out, in]: warped[out] = sum warp * power[in]
    warp.scatter_add_(2, high[..., None], frac[..., None])
    return warp.transpose(1, 2) @ filterbank


def _lengths_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(batch, max_len) bool mask: True inside each sequence."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class LogMel(nn.Module):
    """Waveforms (batch, samples) -> normalised log-mel (batch, n_mels, frames) and frame counts."""

    def __init__(self, config: FeatureConfig):
        super().__init__()
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown feature normalization {config.normalization!r}")
        if config.win_length > config.n_fft:
            raise ValueError(f"win_ms={config.win_ms} gives a window longer than n_fft={config.n_fft}")
        self.config = config
        self.mel = T.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=config.n_fft,
                                    win_length=config.win_length, hop_length=config.hop_length,
                                    n_mels=config.n_mels, f_min=config.f_min, f_max=config.f_max,
                                    center=True, power=2.0)
        # Global statistics (used when normalization is in GLOBAL_STATISTICS); set when training starts.
        self.register_buffer("mean", torch.zeros(config.n_mels))
        self.register_buffer("std", torch.ones(config.n_mels))

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        return sample_lengths // self.config.hop_length + 1

    def raw(self, waves: torch.Tensor, lengths: torch.Tensor,
            warps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised log-mel with padding frames zeroed; `warps` (batch,): each utterance's vocal tract length
        perturbation factor (warped_filterbanks), None for none."""
        # Zero-pad the end so that the STFT's reflect padding never sees a neighbour's padding:
        # an utterance gives the same frames alone and in a padded batch.
        waves = torch.nn.functional.pad(waves.float(), (0, self.config.n_fft // 2))
        with torch.autocast(waves.device.type, enabled=False):
            if warps is None:
                mel = self.mel(waves)
            else:
                banks = warped_filterbanks(self.mel.mel_scale.fb, warps, self.config.vtlp_boundary_hz)
                mel = torch.einsum("bft,bfm->bmt", self.mel.spectrogram(waves), banks)
            feats = torch.log(mel + 1e-6)
        frames = self.frame_lengths(lengths)
        feats = feats[..., : int(frames.max())]
        mask = _lengths_mask(frames, feats.shape[-1])[:, None, :]
        return feats.masked_fill(~mask, 0.0), frames

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor,
                warps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        feats, frames = self.raw(waves, lengths, warps)
        mask = _lengths_mask(frames, feats.shape[-1])[:, None, :]
        if self.config.normalization in ("per_utterance", "per_utterance_level"):
            dims = (-1,) if self.config.normalization == "per_utterance" else (-2, -1)
            count = frames[:, None, None].to(feats.dtype) * (1 if len(dims) == 1 else feats.shape[1])
            mean = feats.sum(dims, keepdim=True) / count
            var = ((feats - mean) ** 2).masked_fill(~mask, 0.0).sum(dims, keepdim=True) / count
            feats = (feats - mean) / (var.sqrt() + 1e-5)
        elif self.config.normalization in GLOBAL_STATISTICS:
            feats = self.normalize_globally(feats)
        return feats.masked_fill(~mask, 0.0), frames

    def normalize_globally(self, feats: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel (batch, mels, frames) normalised with the global statistics (running_level: level-corrected
        too; `history` as running_level's)."""
        if self.config.normalization == "running_level":
            feats = feats - self.level_shift(feats.mean(1), history)[:, None, :]
        return (feats - self.mean[None, :, None]) / self.std[None, :, None]

    def level_shift(self, levels: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """running_level's correction of each frame (batch, frames): its level so far minus the training set's."""
        cfg, prior = self.config, self.mean.mean()
        return running_level(levels, cfg.level_window_frames, cfg.level_prior_ms / cfg.hop_ms, prior, history) - prior

    @torch.no_grad()
    def set_global_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-5))


class SpecAugment(nn.Module):
    """Frequency and time masking (torchaudio), per utterance, applied only in training mode."""

    def __init__(self, config: FeatureConfig):
        super().__init__()
        self.config = config

    def forward(self, feats: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not self.training:
            return feats
        out = feats.unsqueeze(1)  # (batch, 1, mels, time)
        for _ in range(cfg.freq_masks):
            out = AF.mask_along_axis_iid(out, cfg.freq_mask_width, 0.0, axis=2)
        for i, n in enumerate(frames.tolist()):  # time masks sized by each utterance's own length
            width = min(cfg.time_mask_width, int(cfg.time_mask_max_ratio * n))
            for _ in range(cfg.time_masks if width > 0 else 0):
                out[i, :, :, :n] = AF.mask_along_axis(out[i, :, :, :n], width, 0.0, axis=2)
        return out.squeeze(1)
