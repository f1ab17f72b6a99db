"""Streaming inference: audio in chunks of any size -> partial and final text with word times, as it arrives.

A unidirectional model (ModelConfig.bidirectional false) needs a bounded right context only, so a stream can
compute exactly what the offline pass computes. Every stage is a strided window over the stage before it
(resampling, the STFT, each conv layer, the lookahead convolution): `_Windows` keeps what the next window
still needs, the padding the offline pass adds at the start is added at the start and the one at the end at
`finish` (with the model's end silence), each GRU carries its hidden state and running_level features
their level history. The posteriors of a 16 kHz stream equal those of `ASRModel.posteriors` over the whole
audio (within float tolerance for fp32 weights; int8 ones quantize each call's activations at its own scale,
so there they agree within quantization noise; for audio up to `chunk_seconds`, which the offline pass does
not cut into windows). Other rates are resampled chunk by chunk with torchaudio's
filter, into the samples that `load_audio` makes of the whole audio.

Decoding: greedy, or beam search (with the model's LM) through flashlight's incremental search. Once
something was said, `endpoint_seconds` of sure blanks end a segment: a "final" event with its words, and a
new segment begins (the beam search restarts). "partial" events carry the current segment's text whenever
it changes. Word times count from the start of the stream.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import SAMPLE_RATE, AudioError
from ..decoding import DECODING_FIELDS, Transcription, Word, unknown_option, words_from_emissions
from ..device import autocast
from ..errors import ASRError, OptionsError
from ..features import GLOBAL_STATISTICS, check_number
from ..lm.beam_search import SURE_BLANK, BeamSearchDecoder
from ..model import DeepSpeech2
from ..speech_activity import SPEECH_HOP, SPEECH_WINDOW, keep_spoken_words, speech_frames

if TYPE_CHECKING:
    from .transcribe import ASRModel

SOURCE = "<stream>"  # how audio errors name a stream


class StreamError(ASRError, RuntimeError):
    """A stream used out of order (e.g. fed after `finish`)."""


@dataclass
class StreamOptions:
    """How a stream is cut into segments; `ASRModel.stream(**options)` also takes DecodingOptions' fields."""

    endpoint_seconds: float = 0.8  # sure blanks (blank posterior > SURE_BLANK) after speech that end a segment
    max_segment_seconds: float = 30.0  # a segment longer than this ends at its next sure blank
    speech_check: bool = True  # drop words where the audio has no speech-like sound (speech_activity.py)

    def __post_init__(self) -> None:
        try:
            check_number("endpoint_seconds", self.endpoint_seconds, 0, 3600, above_low=True)
            check_number("max_segment_seconds", self.max_segment_seconds, 0, 24 * 3600, above_low=True)
        except ValueError as e:
            raise OptionsError(str(e)) from None
        if not isinstance(self.speech_check, bool):
            raise OptionsError(f"speech_check: must be true or false, got {self.speech_check!r}")


STREAM_FIELDS = [f.name for f in dataclasses.fields(StreamOptions)]


@dataclass
class StreamEvent:
    """What a chunk of audio changed: a segment's text so far, or its final text."""

    kind: str  # "partial": the current segment so far (it may still change); "final": a finished segment
    text: str
    words: list[Word] = field(default_factory=list)  # times in seconds from the start of the stream
    start: float = 0.0  # seconds: where the segment begins
    end: float = 0.0  # and how far into the stream it is decoded


class _Windows:
    """A sequence (along `dim`) read in windows of `size` items every `stride`, as an unpadded convolution reads
    it, arriving piece by piece: `push` returns the items that the windows it completes cover."""

    def __init__(self, size: int, stride: int, dim: int):
        self.size, self.stride, self.dim = size, stride, dim
        self.buffer: torch.Tensor | None = None
        self.skip = 0  # items to drop from the next input (a stride longer than the window)

    def push(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Append x; the items read by the windows now complete, and how many windows that is."""
        if self.skip:
            dropped = min(self.skip, x.shape[self.dim])
            x, self.skip = x.narrow(self.dim, dropped, x.shape[self.dim] - dropped), self.skip - dropped
        buffer = x if self.buffer is None else torch.cat([self.buffer, x], self.dim)
        n = buffer.shape[self.dim]
        count = (n - self.size) // self.stride + 1 if n >= self.size else 0
        used = buffer.narrow(self.dim, 0, (count - 1) * self.stride + self.size if count else 0)
        consumed = min(count * self.stride, n)
        self.skip += count * self.stride - consumed
        self.buffer = buffer.narrow(self.dim, consumed, n - consumed)
        return used, count


class _Resampler:
    """torchaudio.functional.resample of the whole stream, chunk by chunk: its filter, padding and length."""

    def __init__(self, orig_freq: int, new_freq: int, device: torch.device):
        from torchaudio.functional.functional import _get_sinc_resample_kernel  # what resample() itself uses

        gcd = math.gcd(orig_freq, new_freq)
        self.kernel, self.width = _get_sinc_resample_kernel(orig_freq, new_freq, gcd, device=device,
                                                            dtype=torch.float32)
        self.orig, self.new = orig_freq // gcd, new_freq // gcd
        self.windows = _Windows(self.kernel.shape[-1], self.orig, dim=0)
        self.windows.push(torch.zeros(self.width, device=device))
        self.received = self.produced = 0

    def __call__(self, samples: torch.Tensor, last: bool) -> torch.Tensor:
        self.received += len(samples)
        if last:
            samples = torch.cat([samples, samples.new_zeros(self.width + self.orig)])
        used, count = self.windows.push(samples)
        if not count:
            return samples.new_zeros(0)
        out = F.conv1d(used[None, None], self.kernel, stride=self.orig).transpose(1, 2).reshape(-1)
        if last:
            out = out[: max(0, math.ceil(self.new * self.received / self.orig) - self.produced)]
        self.produced += len(out)
        return out


class _Features:
    """The model's LogMel and normalisation, frame by frame: centred STFT windows (reflect padding at the
    start, the zeros LogMel.raw appends at the end), each frame once its window is complete."""

    def __init__(self, model: DeepSpeech2):
        self.logmel = model.features
        self.spec = model.features.mel.spectrogram
        self.pad = self.spec.n_fft // 2
        self.windows = _Windows(self.spec.n_fft, self.spec.hop_length, dim=0)
        self.held: torch.Tensor | None = torch.zeros(0, device=model.features.mean.device)  # until the padding
        self.levels = torch.zeros(1, 0, device=model.features.mean.device)  # running_level's history
        self.received = self.produced = 0

    def __call__(self, samples: torch.Tensor, last: bool) -> torch.Tensor:
        """16 kHz samples -> the new normalised frames (frames, mels)."""
        self.received += len(samples)
        if self.held is not None:  # the reflect padding needs samples 1 .. pad (or the end's zeros)
            samples = torch.cat([self.held, samples])
            if len(samples) <= self.pad and not last:
                self.held = samples
                return samples.new_zeros(0, self.logmel.config.n_mels)
            self.held = None
            padded = torch.cat([samples, samples.new_zeros(self.pad)])
            samples = torch.cat([padded[1: self.pad + 1].flip(0), samples])
        if last:  # what centring reads past the end: zeros (see LogMel.raw)
            samples = torch.cat([samples, samples.new_zeros(self.spec.n_fft - self.pad)])
        used, count = self.windows.push(samples)
        if last:
            count = min(count, self.received // self.spec.hop_length + 1 - self.produced if self.received else 0)
        if count <= 0:
            return samples.new_zeros(0, self.logmel.config.n_mels)
        spec = torch.stft(used, self.spec.n_fft, self.spec.hop_length, self.spec.win_length, self.spec.window,
                          center=False, return_complex=True).abs().pow(self.spec.power)[:, :count]
        feats = torch.log(self.logmel.mel.mel_scale(spec) + 1e-6)
        config = self.logmel.config
        if config.normalization in GLOBAL_STATISTICS:
            history = self.levels
            if config.normalization == "running_level":  # keep the levels that later frames still need
                levels = torch.cat([history, feats.mean(0)[None]], 1)
                self.levels = levels[:, max(0, levels.shape[1] - config.level_window_frames + 1):]
            feats = self.logmel.normalize_globally(feats[None], history)[0]
        self.produced += count
        return feats.T


class PosteriorStream:
    """A unidirectional model's CTC log-probabilities of a stream: `feed(samples)` and `finish()` return the frames
    that became final (frames, vocab); all of them together are the offline pass's (see the module docstring)."""

    def __init__(self, model: DeepSpeech2, sample_rate: int = SAMPLE_RATE, autocast_dtype: torch.dtype | None = None,
                 on_audio: Callable[[torch.Tensor, bool], None] | None = None):
        """`on_audio(samples, last)` sees the 16 kHz audio as it goes to the features."""
        config = model.config
        if config.bidirectional:
            raise OptionsError("this model cannot stream: its GRUs are bidirectional, so every output frame needs "
                               "the whole utterance; train one with model.bidirectional=false (e.g. the recipes' "
                               "streaming.yaml)")
        if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or not 1 <= sample_rate <= 1_000_000:
            raise OptionsError(f"sample_rate must be a whole number of Hz (1 to 1000000), not {sample_rate!r}")
        self.model, self.autocast_dtype = model.eval(), autocast_dtype
        self.device = next(model.parameters()).device
        self.sample_rate, self.on_audio = sample_rate, on_audio
        self.resampler = _Resampler(sample_rate, SAMPLE_RATE, self.device) if sample_rate != SAMPLE_RATE else None
        self.features = _Features(model)
        self.conv_windows, freq = [], config.features.n_mels
        self.conv_shapes = []  # (channels, freq) of each conv layer's input
        in_ch = 1
        for layer, (before, _) in zip(model.conv.layers, model.conv.time_padding):
            conv = layer["conv"]
            windows = _Windows(conv.kernel_size[0], conv.stride[0], dim=2)
            windows.push(torch.zeros(1, in_ch, before, freq, device=self.device))
            self.conv_windows.append(windows)
            self.conv_shapes.append((in_ch, freq))
            freq = (freq + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
            in_ch = conv.out_channels
        self.conv_shapes.append((in_ch, freq))
        self.hidden: list[torch.Tensor | None] = [None] * len(model.rnns)
        self.lookahead = _Windows(model.lookahead.frames + 1, 1, dim=1)
        self.finished, self.heard = False, 0

    @property
    def samples(self) -> int:
        """16 kHz samples received so far (after resampling; without the model's end silence)."""
        return self.heard

    @torch.no_grad()
    def feed(self, samples: torch.Tensor) -> torch.Tensor:
        """Mono float samples at `sample_rate` -> the log-probability frames (frames, vocab) they complete."""
        return self._run(samples, last=False)

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        """The end of the stream: the remaining frames."""
        return self._run(torch.zeros(0), last=True)

    def _run(self, samples: torch.Tensor, last: bool) -> torch.Tensor:
        if self.finished:
            raise StreamError("this stream is finished; start another (ASRModel.stream) for more audio")
        self.finished = last
        samples = samples.to(self.device, torch.float32)
        if self.resampler is not None:
            samples = self.resampler(samples, last)
        if self.on_audio is not None:
            self.on_audio(samples, last)
        self.heard += len(samples)
        if last and not self.heard:  # no audio, no frames (padding alone would give some)
            return torch.zeros(0, self.model.config.output_size)
        if last:  # what DeepSpeech2.append_end_silence adds
            samples = torch.cat([samples, samples.new_zeros(self.model.config.end_silence_samples)])
        x = self.features(samples, last)
        with autocast(self.device, self.autocast_dtype):
            return self._network(x, last).cpu()

    def _network(self, feats: torch.Tensor, last: bool) -> torch.Tensor:
        """New feature frames (frames, mels) -> new log-probabilities (frames, config.output_size), as
        DeepSpeech2.forward computes them."""
        model = self.model
        x = feats[None, None]  # (1, channels, time, freq)
        for layer, windows, (_, after), (in_ch, freq), (out_ch, out_freq) in zip(
                model.conv.layers, self.conv_windows, model.conv.time_padding, self.conv_shapes, self.conv_shapes[1:]):
            if last:
                x = torch.cat([x, x.new_zeros(1, in_ch, after, freq)], 2)
            used, count = windows.push(x)
            if not count:
                x = x.new_zeros(1, out_ch, 0, out_freq)
                continue
            conv = layer["conv"]
            x = model.conv.act(layer["norm"](F.conv2d(used, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]))))
        x = x.permute(0, 2, 1, 3).flatten(2)  # (1, time, channels * freq)
        if not x.shape[1]:
            x = x.new_zeros(1, 0, model.config.gru_hidden)
        for i, rnn in enumerate(model.rnns if x.shape[1] else []):
            x, self.hidden[i] = rnn.gru(rnn.norm(x), self.hidden[i])
        if model.lookahead.frames:
            if last:
                x = torch.cat([x, x.new_zeros(1, model.lookahead.frames, x.shape[2])], 1)
            used, count = self.lookahead.push(x)
            x = model.lookahead.conv(used.transpose(1, 2)).transpose(1, 2) if count else used
        return model.output_log_probs(x)[0]


class _SpeechFrames:
    """speech_activity.speech_frames of the whole stream, computed as the audio arrives (frame i centred on
    sample i * SPEECH_HOP): each call reads two frames of context and keeps only frames whose samples it had."""

    def __init__(self):
        self.audio = torch.zeros(0)  # from sample `start` on
        self.start = self.received = self.done = 0
        self.frames = torch.zeros(1024, dtype=torch.bool)  # frames[: done] are known

    @property
    def known(self) -> torch.Tensor:
        return self.frames[: self.done]

    def __call__(self, samples: torch.Tensor, last: bool) -> None:
        self.audio = torch.cat([self.audio, samples.detach().float().cpu()])
        self.received += len(samples)
        if last:
            end = max(self.received, SPEECH_WINDOW) // SPEECH_HOP + 1
        else:
            end = (self.received - SPEECH_WINDOW // 2) // SPEECH_HOP + 1  # frames whose samples all arrived
        base = self.start // SPEECH_HOP  # frame k of speech_frames(self.audio) is frame base + k of the stream
        if end <= self.done:
            return
        new = speech_frames(self.audio)[self.done - base: end - base]
        while self.done + len(new) > len(self.frames):
            self.frames = torch.cat([self.frames, torch.zeros_like(self.frames)])
        self.frames[self.done: self.done + len(new)] = new
        self.done += len(new)
        start = max(0, (self.done - 2) * SPEECH_HOP)  # frame done - 2 and on read no padding of speech_frames
        self.audio, self.start = self.audio[start - self.start:], start


class Streamer:
    """Speech to text as the audio arrives: `feed(samples)` each chunk, `finish()` at the end; both return the
    StreamEvents they cause. Build it with `ASRModel.stream(sample_rate, **options)`."""

    def __init__(self, model: ASRModel, sample_rate: int = SAMPLE_RATE, **options):
        for name in options:
            if name not in STREAM_FIELDS and name not in DECODING_FIELDS:
                raise unknown_option(name, STREAM_FIELDS + DECODING_FIELDS, "stream")
        self.options = StreamOptions(**{k: v for k, v in options.items() if k in STREAM_FIELDS})
        self.decoding = dataclasses.replace(model.decoding, **{k: v for k, v in options.items()
                                                               if k in DECODING_FIELDS})
        self.speech = _SpeechFrames() if self.options.speech_check else None
        self.posteriors = PosteriorStream(model.model, sample_rate, model.autocast_dtype, on_audio=self.speech)
        # what the decoder reads: its output layer's columns (a model with word pieces: see ASRModel.columns)
        self.vocab, self.columns = model.vocabulary(self.decoding.decoder), model.columns(self.decoding.decoder)
        self.frame_seconds = model.frame_seconds
        self.beam = None
        if self.decoding.decoder == "beam":  # its own search: flashlight holds one stream's state
            self.beam = BeamSearchDecoder(self.vocab, model.lm if self.decoding.lexicon else None, self.decoding)
            self.beam.begin_piece()
        self.endpoint_frames = max(1, round(self.options.endpoint_seconds / self.frame_seconds))
        self.max_frames = max(1, round(self.options.max_segment_seconds / self.frame_seconds))
        self.frames = 0  # posterior frames decoded
        self.previous = self.vocab.blank  # the last frame's best token (greedy collapses repeats)
        self._new_segment(0)

    def _new_segment(self, first: int) -> None:
        self.segment_start = first  # frame
        self.emitted: list[tuple[str, int, float]] = []  # greedy: character, frame, posterior
        self.segment_frames: list[torch.Tensor] = []  # beam: the segment's log-probabilities
        self.said = False  # a frame's best token was not blank
        self.blank_run = 0
        self.shown = ""  # the last partial text

    @property
    def duration(self) -> float:
        """Seconds of (16 kHz) audio received."""
        return self.posteriors.samples / SAMPLE_RATE

    def feed(self, samples: np.ndarray | torch.Tensor) -> list[StreamEvent]:
        """The next chunk: samples (time,) or (time, channels), float in [-1, 1] or int16/int32 PCM."""
        wave = self._check(samples)
        if not len(wave):
            return []
        return self._step(wave, last=False)

    def finish(self) -> list[StreamEvent]:
        """The end of the audio: the last segment's final event (if anything was said)."""
        return self._step(torch.zeros(0), last=True)

    def _check(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        wave = samples if isinstance(samples, torch.Tensor) else torch.as_tensor(np.asarray(samples))
        if wave.dtype == torch.int16:
            wave = wave.float() / 32768.0
        elif wave.dtype == torch.int32:
            wave = wave.float() / 2147483648.0
        elif not wave.is_floating_point():
            raise AudioError(SOURCE, f"unsupported sample type {wave.dtype} (float, int16 or int32 PCM)")
        if wave.ndim == 2:
            wave = wave.float().mean(1)
        elif wave.ndim != 1:
            raise AudioError(SOURCE, f"expected samples of shape (time,) or (time, channels), got {tuple(wave.shape)}")
        wave = wave.float()
        if not torch.isfinite(wave).all():
            raise AudioError(SOURCE, "audio contains NaN or infinite samples")
        return wave

    def _step(self, wave: torch.Tensor, last: bool) -> list[StreamEvent]:
        log_probs = self.posteriors.finish() if last else self.posteriors.feed(wave)
        events = self._decode(log_probs[:, self.columns])
        if last:
            if self.said or self.shown:
                events.append(self._final(self.frames, clamp=True))
        elif self.frames > self.segment_start:
            partial = self._event("partial", self._segment(partial=True), round(self.frames * self.frame_seconds, 3))
            if partial.text != self.shown:
                self.shown = partial.text
                events.append(partial)
        return events

    def _decode(self, log_probs: torch.Tensor) -> list[StreamEvent]:
        """Greedy-decode new frames and find endpoints; a segment's frames go to the beam search as they come."""
        events, first = [], 0  # first: the chunk's frame where the current segment's new frames begin
        best_prob, best = log_probs.max(-1)
        sure = (log_probs[:, self.vocab.blank] > math.log(SURE_BLANK)).tolist()
        for t, (token, prob) in enumerate(zip(best.tolist(), best_prob.exp().tolist())):
            frame = self.frames + t
            if token != self.vocab.blank and token != self.previous:
                self.emitted.append((self.vocab.tokens[token], frame, prob))
            self.previous = token
            self.said |= token != self.vocab.blank
            self.blank_run = self.blank_run + 1 if sure[t] else 0
            long = frame + 1 - self.segment_start >= self.max_frames
            if self.said and (self.blank_run >= self.endpoint_frames or (long and sure[t])):
                self._to_beam(log_probs[first: t + 1])
                events.append(self._final(frame + 1, clamp=False))
                self._new_segment(frame + 1)
                first = t + 1
        self._to_beam(log_probs[first:])
        self.frames += len(log_probs)
        return events

    def _to_beam(self, log_probs: torch.Tensor) -> None:
        if self.beam is not None and len(log_probs):
            self.beam.step_piece(log_probs)
            self.segment_frames.append(log_probs)

    def _segment(self, partial: bool) -> Transcription:
        """The current segment's text and words (the beam search's best so far when `partial`)."""
        if self.beam is None:
            chars, frames, probs = zip(*self.emitted) if self.emitted else ((), (), ())
        else:
            emissions = torch.cat(self.segment_frames) if self.segment_frames else torch.zeros(0, len(self.vocab))
            emitted = self.beam.piece_so_far(emissions) if partial else self.beam.end_piece(emissions)
            emitted += [(" ", 0, 0.0)]
            chars, frames, probs = zip(*[(c, self.segment_start + f, p) for c, f, p in emitted])
        return words_from_emissions(list(chars), list(frames), list(probs), self.frame_seconds)

    def _final(self, end: int, clamp: bool) -> StreamEvent:
        result = self._segment(partial=False)
        if self.beam is not None:
            self.beam.begin_piece()
        end_seconds = round(end * self.frame_seconds, 3)
        if clamp:  # as the offline pass: nothing ends past the audio
            end_seconds = min(end_seconds, round(self.duration, 3))
            result.end_words_by(end_seconds)
        return self._event("final", result, end_seconds)

    def _event(self, kind: str, result: Transcription, end_seconds: float) -> StreamEvent:
        if self.speech is not None:
            late = self.posteriors.model.config.end_silence_seconds  # how late the model may spell a word
            result = keep_spoken_words(result, self.speech.known, lookback_seconds=late)
        return StreamEvent(kind, result.text, result.words, round(self.segment_start * self.frame_seconds, 3),
                           end_seconds)
