"""Deep Speech 2 family acoustic model: log-mel -> 2-D conv front -> GRUs -> CTC logits.

The GRUs are bidirectional (the default), or unidirectional followed by a lookahead ("row") convolution over
a few future frames (Deep Speech 2, section 3.7), with a conv front that looks no further ahead: such a
model needs a bounded right context (ModelConfig.future_feature_frames), so it can run on a stream.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .audio import SAMPLE_RATE
from .features import CAUSAL_NORMALIZATIONS, FeatureConfig, LogMel, SpecAugment, _lengths_mask, check_number

MAX_PARAMETERS = 1_000_000_000  # 4 GB of fp32 weights; Deep Speech 2 itself has about 60 M
MAX_LOOKAHEAD = 16  # output frames
MAX_END_SILENCE_MS = 5000


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
    # >0: a second output layer, over this many word pieces, beside the first (characters): one pass gives both,
    # the pieces for greedy decoding (whole words without an LM), the characters for a beam search spelling an
    # LM's words; their log-probabilities come out side by side (characters first)
    word_piece_vocab_size: int = 0
    # False: one-way GRUs, then a lookahead convolution over the current and `lookahead_frames` next output
    # frames; the conv front then looks at most `lookahead_frames` output frames ahead as well
    bidirectional: bool = True
    lookahead_frames: int = 0
    # silence (zero samples) appended to every input, in training and at inference alike: a one-way model then
    # hears an utterance's last word out before its input ends, instead of having to spell it while still
    # hearing it (CTC lets it emit late, but only into frames that exist)
    end_silence_ms: float = 0.0

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
                raise ValueError(f"{key}: needs one entry per conv layer ({len(self.conv_channels)}, as "
                                 f"conv_channels), a [time, freq] pair each; got {pairs!r}")
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
        if self.word_piece_vocab_size != 0:
            check_number("word_piece_vocab_size", self.word_piece_vocab_size, 2, 1_000_000, integer=True)
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"bidirectional: must be true or false, got {self.bidirectional!r}")
        check_number("lookahead_frames", self.lookahead_frames, 0, MAX_LOOKAHEAD, integer=True)
        check_number("end_silence_ms", self.end_silence_ms, 0, MAX_END_SILENCE_MS)
        if self.bidirectional and self.lookahead_frames:
            raise ValueError(f"lookahead_frames: only a unidirectional model (bidirectional: false) has a lookahead "
                             f"convolution (a bidirectional one sees the whole utterance), got {self.lookahead_frames}")
        if not self.bidirectional and self.features.normalization not in CAUSAL_NORMALIZATIONS:
            raise ValueError(f"features.normalization: a unidirectional model (bidirectional: false) needs "
                             f"{' or '.join(CAUSAL_NORMALIZATIONS)} (per-utterance statistics need the whole "
                             f"utterance), got {self.features.normalization!r}")
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
        directions = 2 if self.bidirectional else 1
        for _ in range(self.gru_layers):
            count += 2 * size + directions * (3 * h * size + 3 * h * h + 6 * h)  # LayerNorm, GRU
            size = h
        if self.lookahead_frames:
            count += h * (self.lookahead_frames + 1)
        heads = [self.vocab_size] + ([self.word_piece_vocab_size] if self.word_piece_vocab_size else [])
        return count + sum(2 * h + h * v + v for v in heads)

    @property
    def output_size(self) -> int:
        """Columns of the network's output: the characters' log-probabilities, then any word pieces'."""
        return self.vocab_size + self.word_piece_vocab_size

    @property
    def time_stride(self) -> int:
        stride = 1
        for s in self.conv_strides:
            stride *= s[0]
        return stride

    @property
    def end_silence_seconds(self) -> float:
        """How late after a word's sound the model may spell it (its end silence)."""
        return self.end_silence_ms / 1000

    @property
    def end_silence_samples(self) -> int:
        """end_silence_ms in 16 kHz samples."""
        return round(self.end_silence_ms * SAMPLE_RATE / 1000)

    @property
    def frame_seconds(self) -> float:
        """Seconds between consecutive output frames."""
        return self.features.hop_ms / 1000 * self.time_stride

    @property
    def conv_time_padding(self) -> list[tuple[int, int]]:
        """Zero frames (before, after) each conv layer adds in time.

        Bidirectional: kernel // 2 on each side. Unidirectional: the same total (so the same frame counts),
        moved before, so that the conv front reads no more than lookahead_frames * time_stride feature frames
        past an output frame's own (earlier layers take what they need of that first, each no further than
        symmetric padding would).
        """
        return self._conv_time_padding_and_reach()[0]

    @property
    def future_feature_frames(self) -> int | None:
        """The right context in feature frames: output frame t depends on feature frames up to
        t * time_stride + future_feature_frames, none later; None for a bidirectional model (the whole utterance).

        That is what the conv front reads ahead plus lookahead_frames output frames of the lookahead convolution.
        """
        if self.bidirectional:
            return None
        return self._conv_time_padding_and_reach()[1] + self.lookahead_frames * self.time_stride

    @property
    def future_samples(self) -> int | None:
        """The right context in samples: output frame t depends on no sample from
        t * time_stride * hop_length + future_samples on (feature frame j reads samples before
        j * hop_length + n_fft - n_fft // 2); None for a bidirectional model."""
        frames = self.future_feature_frames
        if frames is None:
            return None
        return frames * self.features.hop_length + self.features.n_fft - self.features.n_fft // 2

    def _conv_time_padding_and_reach(self) -> tuple[list[tuple[int, int]], int]:
        """conv_time_padding, and how many feature frames past its own the conv front's output frame reads."""
        pads, reach, budget, unit = [], 0, self.lookahead_frames * self.time_stride, 1
        for (kt, _), (st, _) in zip(self.conv_kernels, self.conv_strides):
            if self.bidirectional:
                pads.append((kt // 2, kt // 2))
                continue
            ahead = min((kt - 1) // 2, budget // unit)  # output i reads input frames up to i * st + ahead
            before = kt - 1 - ahead
            pads.append((before, 2 * (kt // 2) - before))
            reach, budget, unit = reach + ahead * unit, budget - ahead * unit, unit * st
        return pads, reach


def _conv_time_lengths(lengths: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Output frame counts of a convolution over time with `padding` zero frames in all."""
    return torch.div(lengths + padding - kernel, stride, rounding_mode="floor") + 1


class ConvFront(nn.Module):
    """2-D convolutions over (time, mel) with BatchNorm and Hardtanh; padding frames re-zeroed after each.

    Time padding as ModelConfig.conv_time_padding: inside the convolution where symmetric, else added before it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers = []
        in_ch, freq = 1, cfg.features.n_mels
        self.time_padding = cfg.conv_time_padding
        for ch, (kt, kf), (st, sf), (before, after) in zip(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides,
                                                           self.time_padding):
            inside = before if before == after else 0
            layers.append(nn.ModuleDict({
                "conv": nn.Conv2d(in_ch, ch, (kt, kf), (st, sf), (inside, kf // 2), bias=False),
                "norm": nn.BatchNorm2d(ch),
            }))
            freq = (freq + 2 * (kf // 2) - kf) // sf + 1
            in_ch = ch
        self.layers = nn.ModuleList(layers)
        self.act = nn.Hardtanh(0, 20)
        self.output_dim = in_ch * freq

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frame counts for inputs of `lengths` frames."""
        for layer, (before, after) in zip(self.layers, self.time_padding):
            lengths = self._layer_lengths(lengths, layer["conv"], before + after)
        return lengths

    @staticmethod
    def _layer_lengths(lengths: torch.Tensor, conv: nn.Conv2d, padding: int) -> torch.Tensor:
        return _conv_time_lengths(lengths, conv.kernel_size[0], conv.stride[0], padding)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, time, mel) -> (batch, time', channels * freq'), lengths'."""
        x = x.unsqueeze(1)
        for layer, (before, after) in zip(self.layers, self.time_padding):
            if before != after:
                x = F.pad(x, (0, 0, before, after))
            x = self.act(layer["norm"](layer["conv"](x)))
            lengths = self._layer_lengths(lengths, layer["conv"], before + after)
            x = x.masked_fill(~_lengths_mask(lengths, x.shape[2])[:, None, :, None], 0.0)
        b, c, t, f = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, t, c * f), lengths


class GRULayer(nn.Module):
    """LayerNorm -> GRU over packed sequences; a bidirectional one's directions summed (as in Deep Speech 2)."""

    def __init__(self, input_size: int, hidden: int, dropout: float, bidirectional: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.gru = nn.GRU(input_size, hidden, batch_first=True, bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.hidden = hidden

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.cpu()
        if bool((lengths == x.shape[1]).all()):  # nothing padded (one utterance): packing would only cost time
            out, _ = self.gru(self.norm(x))
        else:
            packed = pack_padded_sequence(self.norm(x), lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        if self.gru.bidirectional:
            out = out[..., : self.hidden] + out[..., self.hidden:]
        return self.dropout(out)


class Lookahead(nn.Module):
    """Deep Speech 2's row convolution (section 3.7): each channel of output frame t a weighted sum of its
    values in frames t .. t + frames, zero past each utterance's end. Starts as the identity; with
    frames=0 it is the identity and has no weights."""

    def __init__(self, channels: int, frames: int):
        super().__init__()
        self.frames = frames
        if frames:
            self.conv = nn.Conv1d(channels, channels, frames + 1, groups=channels, bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, 0, 0] = 1.0

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x: (batch, time, channels) -> the same shape."""
        if not self.frames:
            return x
        x = x.masked_fill(~_lengths_mask(lengths, x.shape[1])[:, :, None], 0.0)
        return self.conv(F.pad(x.transpose(1, 2), (0, self.frames))).transpose(1, 2)


class DeepSpeech2(nn.Module):
    """Waveforms in, CTC log-probabilities out. Feature extraction is part of the module."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.features = LogMel(config.features)
        self.spec_augment = SpecAugment(config.features)
        self.conv = ConvFront(config)
        sizes = [self.conv.output_dim] + [config.gru_hidden] * config.gru_layers
        self.rnns = nn.ModuleList(GRULayer(i, config.gru_hidden, config.dropout, config.bidirectional)
                                  for i in sizes[:-1])
        self.lookahead = Lookahead(config.gru_hidden, config.lookahead_frames)
        self.head = nn.Sequential(nn.LayerNorm(config.gru_hidden), nn.Linear(config.gru_hidden, config.vocab_size))
        self.piece_head = (nn.Sequential(nn.LayerNorm(config.gru_hidden),
                                         nn.Linear(config.gru_hidden, config.word_piece_vocab_size))
                           if config.word_piece_vocab_size else None)

    def output_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layers on the last GRU layer's (lookahead's) output: (batch, frames, config.output_size)."""
        log_probs = self.head(hidden).float().log_softmax(-1)
        if self.piece_head is None:
            return log_probs
        return torch.cat([log_probs, self.piece_head(hidden).float().log_softmax(-1)], -1)

    def replace_output_layer(self, layer: nn.Linear) -> None:
        """Emit another vocabulary: the output layer becomes a copy of `layer`, the rest stays as it is (a model
        fine-tuned from characters to word pieces)."""
        if layer.in_features != self.config.gru_hidden:
            raise ValueError(f"replace_output_layer: {layer.in_features} inputs for {self.config.gru_hidden} GRU units")
        self.head[1] = copy.deepcopy(layer)
        self.config = dataclasses.replace(self.config, vocab_size=layer.out_features)

    def load_forward_direction(self, source: DeepSpeech2) -> None:
        """Start this one-way model from a bidirectional one of the same sizes: its conv front, norms and head, and
        its GRUs' forward direction (the lookahead stays as it is: new, the identity). The feature statistics
        are left alone: the two may normalise differently."""
        if self.config.bidirectional or not source.config.bidirectional:
            raise ValueError("load_forward_direction: from a bidirectional model into a unidirectional one")
        state = {k: v for k, v in source.state_dict().items()
                 if not k.endswith("_reverse") and k not in ("features.mean", "features.std")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(("lookahead.", "features.")) for k in missing):
            raise ValueError(f"load_forward_direction: the models' sizes differ (missing {missing}, "
                             f"unexpected {unexpected})")

    @torch.no_grad()
    def load_widened(self, source: DeepSpeech2, noise: float = 0.0, seed: int = 0) -> None:
        """Start from a model of the same settings but k times narrower GRUs (Net2Net's wider network, Chen et
        al. 2016): each hidden unit is copied k times and whatever reads the copies reads each at 1/k, so this
        model computes what the source does (a LayerNorm that sees each value k times keeps their mean and
        variance). `noise`: Gaussian noise, this fraction of each widened matrix's standard deviation, to set
        the copies apart (dropout does too); the outputs are then only close to the source's."""
        narrow, wide = source.config.gru_hidden, self.config.gru_hidden
        if wide <= narrow or wide % narrow:
            raise ValueError(f"load_widened: gru_hidden {wide} is not a multiple of the source's {narrow}")
        k = wide // narrow
        units = torch.arange(wide) % narrow  # wide unit -> the narrow unit it copies
        gates = torch.cat([g * narrow + units for g in range(3)])  # GRU rows: reset, update and new gates
        generator = torch.Generator().manual_seed(seed)

        def widened(name: str, value: torch.Tensor) -> torch.Tensor:
            reads_hidden = (name.startswith(("head.", "piece_head."))
                            or (name.startswith("rnns.") and not name.startswith("rnns.0.")))
            if ".gru." in name:
                value = value[gates]
                if ".weight_hh" in name or (reads_hidden and ".weight_ih" in name):
                    value = value[:, units] / k
            elif name in ("head.1.weight", "piece_head.1.weight"):
                value = value[:, units] / k
            elif name.startswith(("head.0.", "piece_head.0.", "lookahead.")) or (reads_hidden and ".norm." in name):
                value = value[units]
            return value

        state = source.state_dict()
        for name, value in state.items():
            if name.startswith(("rnns.", "head.", "piece_head.", "lookahead.")):
                state[name] = widened(name, value)
                if noise and value.dim() > 1 and state[name].shape != value.shape:
                    state[name] += noise * value.std() * torch.randn(state[name].shape, generator=generator)
        self.load_state_dict(state)

    def num_parameters(self) -> int:
        """The network's size, from its configuration: int8-quantized layers (quantize_int8) hold their weights
        outside `parameters()`, and count too."""
        return self.config._parameter_count()

    def output_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Number of output frames for waveforms of the given sample counts."""
        end_silence = self.config.end_silence_samples
        return self.conv.output_lengths(self.features.frame_lengths(sample_lengths + end_silence))

    def append_end_silence(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded batch with config.end_silence_ms of zeros after each waveform's end, whatever the padding held."""
        end_silence = self.config.end_silence_samples
        if not end_silence:
            return waves, lengths
        waves = F.pad(waves, (0, end_silence))
        past_end = torch.arange(waves.shape[1], device=waves.device)[None, :] >= lengths.to(waves.device)[:, None]
        return waves.masked_fill(past_end, 0.0), lengths + end_silence

    def input_features(self, waves: torch.Tensor, lengths: torch.Tensor,
                       warps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network reads: the normalised log-mel (batch, mels, frames) of the waveforms with their end
        silence, and frame counts (the ONNX graph starts from these); `warps`: LogMel.raw's."""
        return self.features(*self.append_end_silence(waves, lengths), warps)

    def draw_warps(self, batch: int) -> torch.Tensor | None:
        """Each utterance's vocal tract length perturbation factor, uniform in features.vtlp_warp (None without)."""
        if not self.config.features.vtlp_warp:
            return None
        low, high = self.config.features.vtlp_warp
        return low + (high - low) * torch.rand(batch)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, intermediate_layer: int = 0,
                warps: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """waves: (batch, samples) float, lengths: (batch,) -> log-probs (batch, frames, config.output_size), frames.
        In training mode the features are augmented (vocal tract length perturbation, SpecAugment).
        With `intermediate_layer` k > 0, a third output: the log-probs that the first output layer reads from GRU
        layer k's output (1-based), for intermediate CTC (Lee and Watanabe, 2021).
        `warps` (batch,): each utterance's frequency warp factor (LogMel.raw's), in any mode, instead of those
        drawn in training (e.g. a test-time warp, bench/test_time_views.py)."""
        if not 0 <= intermediate_layer <= len(self.rnns):
            raise ValueError(f"intermediate_layer: a GRU layer from 1 to {len(self.rnns)} (0: none), "
                             f"got {intermediate_layer}")
        if warps is None and self.training:
            warps = self.draw_warps(len(waves))
        feats, frames = self.input_features(waves, lengths, warps)
        feats = self.spec_augment(feats, frames)
        x, out_lengths = self.conv(feats.transpose(1, 2), frames)
        intermediate = None
        for layer, rnn in enumerate(self.rnns, 1):
            x = rnn(x, out_lengths)
            if layer == intermediate_layer:
                intermediate = self.head(x).float().log_softmax(-1)
        log_probs = self.output_log_probs(self.lookahead(x, out_lengths))
        return (log_probs, out_lengths) if intermediate is None else (log_probs, out_lengths, intermediate)
