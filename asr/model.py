"""Deep Speech 2 family acoustic model: log-mel -> 2-D conv front -> bidirectional GRUs -> CTC logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .features import FeatureConfig, LogMel, SpecAugment, _lengths_mask, check_number

MAX_PARAMETERS = 1_000_000_000  # 4 GB of fp32 weights; Deep Speech 2 itself has about 60 M


@dataclass
class ModelConfig:
    """All sizes of the network; saved with the weights."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    conv_channels: list[int] = field(default_factory=lambda: [32, 32])
    conv_kernels: list[list[int]] = field(default_factory=lambda: [[11, 41], [11, 21]])  # (time, freq)
    conv_strides: list[list[int]] = field(default_factory=lambda: [[2, 2], [1, 2]])  # (time, freq)
    gru_layers: int = 3
    gru_hidden: int = 512
    dropout: float = 0.1
    vocab_size: int = 29

    def __post_init__(self) -> None:
        """Check every value (a model.json or a configuration may hold anything); errors name the key."""
        if isinstance(self.features, dict):
            try:
                self.features = FeatureConfig(**self.features)
            except ValueError as e:
                raise ValueError(f"features.{e}") from None
        if not isinstance(self.features, FeatureConfig):
            raise ValueError(f"features: must be a mapping of feature settings, got {self.features!r}")
        if not isinstance(self.conv_channels, (list, tuple)) or not 1 <= len(self.conv_channels) <= 16:
            raise ValueError(f"conv_channels: must be a list of 1 to 16 channel counts, got {self.conv_channels!r}")
        for i, ch in enumerate(self.conv_channels):
            check_number(f"conv_channels[{i}]", ch, 1, 4096, integer=True)
        for key, high in (("conv_kernels", 1024), ("conv_strides", 64)):
            pairs = getattr(self, key)
            if not isinstance(pairs, (list, tuple)) or len(pairs) != len(self.conv_channels):
                raise ValueError(f"{key}: needs one entry per conv layer ({len(self.conv_channels)}, as conv_channels), "
                                 f"a [time, freq] pair each; got {pairs!r}")
            for i, pair in enumerate(pairs):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"{key}[{i}]: must be a [time, freq] pair, got {pair!r}")
                for j, v in enumerate(pair):
                    check_number(f"{key}[{i}][{j}]", v, 1, high, integer=True)
        check_number("gru_layers", self.gru_layers, 1, 64, integer=True)
        check_number("gru_hidden", self.gru_hidden, 1, 16384, integer=True)
        check_number("dropout", self.dropout, 0, 1)
        if self.dropout == 1:
            raise ValueError("dropout: must be below 1 (1 drops everything), got 1")
        check_number("vocab_size", self.vocab_size, 2, 1_000_000, integer=True)
        if self._parameter_count() > MAX_PARAMETERS:
            raise ValueError(f"gru_hidden: with gru_layers={self.gru_layers}, conv_channels={self.conv_channels} and "
                             f"vocab_size={self.vocab_size} the model would have {self._parameter_count():,} "
                             f"parameters, more than {MAX_PARAMETERS:,}")

    def _parameter_count(self) -> int:
        """The number of parameters DeepSpeech2 would have, computed without building it."""
        count, in_ch, freq = 0, 1, self.features.n_mels
        for ch, (kt, kf), (_, sf) in zip(self.conv_channels, self.conv_kernels, self.conv_strides):
            count += in_ch * ch * kt * kf + 2 * ch
            freq, in_ch = (freq + 2 * (kf // 2) - kf) // sf + 1, ch
        size, h = in_ch * max(freq, 1), self.gru_hidden
        for _ in range(self.gru_layers):
            count += 2 * size + 2 * (3 * h * size + 3 * h * h + 6 * h)  # LayerNorm, two directions
            size = h
        return count + 2 * h + h * self.vocab_size + self.vocab_size

    @property
    def time_stride(self) -> int:
        stride = 1
        for s in self.conv_strides:
            stride *= s[0]
        return stride

    @property
    def frame_seconds(self) -> float:
        """Seconds between consecutive output frames."""
        return self.features.hop_ms / 1000 * self.time_stride


def _conv_time_lengths(lengths: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    kt, st, pt = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return torch.div(lengths + 2 * pt - kt, st, rounding_mode="floor") + 1


class ConvFront(nn.Module):
    """2-D convolutions over (time, mel) with BatchNorm and Hardtanh; padding frames re-zeroed after each."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers = []
        in_ch, freq = 1, cfg.features.n_mels
        for ch, (kt, kf), (st, sf) in zip(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides):
            layers.append(nn.ModuleDict({
                "conv": nn.Conv2d(in_ch, ch, (kt, kf), (st, sf), (kt // 2, kf // 2), bias=False),
                "norm": nn.BatchNorm2d(ch),
            }))
            freq = (freq + 2 * (kf // 2) - kf) // sf + 1
            in_ch = ch
        self.layers = nn.ModuleList(layers)
        self.act = nn.Hardtanh(0, 20)
        self.output_dim = in_ch * freq

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, time, mel) -> (batch, time', channels * freq'), lengths'."""
        x = x.unsqueeze(1)
        for layer in self.layers:
            x = self.act(layer["norm"](layer["conv"](x)))
            lengths = _conv_time_lengths(lengths, layer["conv"])
            x = x.masked_fill(~_lengths_mask(lengths, x.shape[2])[:, None, :, None], 0.0)
        b, c, t, f = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, t, c * f), lengths


class BiGRULayer(nn.Module):
    """LayerNorm -> bidirectional GRU over packed sequences, directions summed (as in Deep Speech 2)."""

    def __init__(self, input_size: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.gru = nn.GRU(input_size, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.hidden = hidden

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.norm(x), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        out = out[..., : self.hidden] + out[..., self.hidden:]
        return self.dropout(out)


class DeepSpeech2(nn.Module):
    """Waveforms in, CTC log-probabilities out. Feature extraction is part of the module."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.features = LogMel(config.features)
        self.spec_augment = SpecAugment(config.features)
        self.conv = ConvFront(config)
        sizes = [self.conv.output_dim] + [config.gru_hidden] * config.gru_layers
        self.rnns = nn.ModuleList(BiGRULayer(i, config.gru_hidden, config.dropout) for i in sizes[:-1])
        self.head = nn.Sequential(nn.LayerNorm(config.gru_hidden), nn.Linear(config.gru_hidden, config.vocab_size))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def output_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Number of output frames for waveforms of the given sample counts."""
        lengths = self.features.frame_lengths(sample_lengths)
        for layer in self.conv.layers:
            lengths = _conv_time_lengths(lengths, layer["conv"])
        return lengths

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waves: (batch, samples) float, lengths: (batch,) -> log-probs (batch, frames, vocab), frames."""
        feats, frames = self.features(waves, lengths)
        feats = self.spec_augment(feats, frames)
        x, out_lengths = self.conv(feats.transpose(1, 2), frames)
        for rnn in self.rnns:
            x = rnn(x, out_lengths)
        logits = self.head(x)
        return logits.float().log_softmax(-1), out_lengths
