"""Deep Speech 2 family acoustic model: log-mel -> 2-D conv front -> bidirectional GRUs -> CTC logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .features import FeatureConfig, LogMel, SpecAugment, _lengths_mask


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
        if isinstance(self.features, dict):
            self.features = FeatureConfig(**self.features)
        n = len(self.conv_channels)
        if not (len(self.conv_kernels) == len(self.conv_strides) == n):
            raise ValueError("conv_channels, conv_kernels and conv_strides need one entry per conv layer")
        if self.gru_layers < 1:
            raise ValueError("gru_layers must be at least 1")

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
