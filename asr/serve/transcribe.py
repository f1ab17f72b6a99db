"""The public inference API: `load_model(path)` -> `ASRModel.transcribe(audio)`."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, overload

import soundfile as sf
import torch
from torch import nn

from ..audio import SAMPLE_RATE, AudioInput, load_audio, pad_waves, to_mono_16k
from ..checkpoint import DECODER_FILE, LM_DIR, CheckpointError, load_model_files, word_pieces_of
from ..decoding import DECODING_FIELDS, Decoder, DecodingOptions, GreedyDecoder, Transcription, unknown_option
from ..device import autocast, resolve_device
from ..errors import OptionsError
from ..files import recover_dir
from ..lm.beam_search import BeamSearchDecoder
from ..lm.language_model import LanguageModel
from ..model import DeepSpeech2
from ..speech_activity import SPEECH_HOP, keep_spoken_words, speech_frames
from ..text import Vocabulary
from .onnx_export import OnnxNetwork, load_onnx_network, resolve_backend
from .packaging import default_model_dir
from .streaming import Streamer

DEFAULT_MODEL_ENV = "ASR_MODEL"
PRECISION_ENV = "ASR_PRECISION"  # "auto" (default), "int8" or "fp32"
PRECISIONS = ("auto", "int8", "fp32")


@dataclass
class TranscribeOptions:
    """How audio becomes posteriors: batching and the windows that long audio is cut into. How posteriors become
    text is DecodingOptions (decoding.py); `transcribe(**options)` takes the fields of both."""

    batch_size: int = 16  # windows decoded together
    chunk_seconds: float = 30.0  # longer audio is cut into overlapping windows of this length
    overlap_seconds: float = 4.0  # half of the overlap is trusted from each side when stitching
    # drop words where the audio holds no speech-like sound (silence, hiss, white noise): see speech_activity.py
    speech_check: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            problems.append(f"batch_size must be a whole number >= 1, not {self.batch_size!r}")
        if not 0 <= self.overlap_seconds < self.chunk_seconds:
            problems.append(f"chunk_seconds ({self.chunk_seconds}) must be longer than overlap_seconds "
                            f"({self.overlap_seconds}), and overlap_seconds >= 0")
        if problems:
            raise OptionsError("; ".join(problems))


TRANSCRIBE_FIELDS = [f.name for f in dataclasses.fields(TranscribeOptions)]


@dataclass
class _Window:
    item: int
    start: int  # sample offset into the item
    wave: torch.Tensor


class ASRModel:
    """A trained recognizer: weights, vocabulary and settings, ready to transcribe.

    A model with a second output layer over word pieces (ModelConfig.word_piece_vocab_size; `word_pieces`, by
    default model.json's) decodes greedily from it and searches its beam over the characters of the first: its
    posteriors hold both layers' log-probabilities side by side, and `columns` says which a decoder reads.
    """

    def __init__(self, model: DeepSpeech2, vocab: Vocabulary, meta: dict | None = None,
                 lm: LanguageModel | None = None, decoding: DecodingOptions | None = None,
                 onnx: OnnxNetwork | None = None, autocast_dtype: torch.dtype | None = None,
                 precision: str = "fp32", word_pieces: Vocabulary | None = None):
        self.model = model.eval()
        self.onnx = onnx  # when set, onnxruntime runs the network after the (torch) features
        self.autocast_dtype = autocast_dtype  # e.g. bf16 while training on a GPU; None: full precision
        self.precision = precision  # the network's weights: "int8" (quantize_int8) or "fp32"
        self.vocab = vocab
        self.meta = meta or {}
        self.word_pieces = word_pieces if word_pieces is not None else word_pieces_of(self.meta)
        pieces = len(self.word_pieces) if self.word_pieces else 0
        if model.config.word_piece_vocab_size != pieces:
            raise ValueError(f"the model has {model.config.word_piece_vocab_size} word piece outputs, its word pieces "
                             f"{pieces} tokens")
        self.lm = lm
        # the model's decoding defaults: decoder.json's (its decoder and tuned beam), else greedy; beam search
        # spells LM words when there is an LM
        self.decoding = decoding or DecodingOptions(lexicon=lm is not None)
        self._greedy = GreedyDecoder(self.vocabulary("greedy"))
        self._beam_decoders: dict[str, BeamSearchDecoder] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def backend(self) -> str:
        """What runs the network: "onnx" (onnxruntime) or "torch"."""
        return "torch" if self.onnx is None else "onnx"

    def _network(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded 16 kHz waveforms -> CTC log-probabilities and frame counts, by the chosen backend."""
        if self.onnx is None:
            with autocast(self.device, self.autocast_dtype):
                log_probs, frames = self.model(waves.to(self.device), lengths.to(self.device))
            return log_probs.float(), frames
        return self.onnx(*self.model.input_features(waves, lengths))

    def columns(self, decoder: str) -> slice:
        """The columns of `posteriors` that `decoder` ("greedy" or "beam") reads: a model with word pieces
        decodes greedily from their output layer (the last columns), and searches beams over characters."""
        chars = len(self.vocab)
        return slice(chars, None) if decoder == "greedy" and self.word_pieces is not None else slice(0, chars)

    def vocabulary(self, decoder: str) -> Vocabulary:
        """The vocabulary of the columns that `decoder` reads."""
        return self.word_pieces if decoder == "greedy" and self.word_pieces is not None else self.vocab

    @property
    def frame_seconds(self) -> float:
        return self.model.config.frame_seconds

    def _samples_per_frame(self) -> int:
        return self.model.config.features.hop_length * self.model.config.time_stride

    def _window_starts(self, samples: int, opts: TranscribeOptions) -> tuple[list[int], int]:
        """Start samples of the overlapping windows that cover `samples`, and the window length."""
        per_frame = self._samples_per_frame()
        chunk = int(opts.chunk_seconds * SAMPLE_RATE) // per_frame * per_frame
        overlap = int(opts.overlap_seconds * SAMPLE_RATE) // per_frame * per_frame
        if chunk <= overlap:
            raise OptionsError(f"chunk_seconds ({opts.chunk_seconds}) must exceed overlap_seconds "
                               f"({opts.overlap_seconds}) by at least one output frame")
        if samples <= chunk:
            return [0], chunk
        return list(range(0, samples - overlap, chunk - overlap)), chunk

    def _windows(self, item: int, wave: torch.Tensor, opts: TranscribeOptions) -> list[_Window]:
        starts, chunk = self._window_starts(len(wave), opts)
        return [_Window(item, s, wave[s: s + chunk]) for s in starts]

    def _window_posteriors(self, windows: list[_Window], batch_size: int) -> list[torch.Tensor]:
        """CTC log-probabilities of each window, batched in length order."""
        order = sorted(range(len(windows)), key=lambda k: len(windows[k].wave))
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(windows)
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            log_probs, out_lengths = self._network(*pad_waves([windows[k].wave for k in idx]))
            for row, k in enumerate(idx):
                outputs[k] = log_probs[row, : out_lengths[row]].cpu()
        return outputs

    def _stitch(self, pieces: list[tuple[int, torch.Tensor]], opts: TranscribeOptions) -> torch.Tensor:
        """One item's windows' (start sample, log-probs), in order, joined at the middle of each overlap."""
        per_frame = self._samples_per_frame()
        half_overlap = int(opts.overlap_seconds * SAMPLE_RATE) // per_frame // 2
        kept = []
        for j, (start, lp) in enumerate(pieces):
            first = 0 if j == 0 else half_overlap
            last = len(lp) if j == len(pieces) - 1 else (pieces[j + 1][0] - start) // per_frame + half_overlap
            kept.append(lp[first:last])
        return torch.cat(kept)

    @torch.no_grad()
    def posteriors(self, waves: Sequence[torch.Tensor], options: TranscribeOptions | None = None
                   ) -> list[torch.Tensor]:
        """CTC log-probabilities (frames, vocab) per 16 kHz waveform, long ones windowed and stitched; of a model
        with word pieces, (frames, characters + word pieces): see `columns`."""
        opts = options or TranscribeOptions()
        windows = [w for i, wave in enumerate(waves) for w in self._windows(i, wave, opts)]
        outputs = self._window_posteriors(windows, opts.batch_size)
        return [self._stitch([(w.start, lp) for w, lp in zip(windows, outputs) if w.item == i], opts)
                for i in range(len(waves))]

    @torch.no_grad()
    def _stream_file(self, path: str | os.PathLike, opts: TranscribeOptions
                     ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """Log-probabilities, speech frames and duration of a long file, read a batch of windows at a time.

        Memory stays bounded by the windows in flight, whatever the length. None when the file is not
        longer than one window, or its header or data cannot be trusted (the caller then reads it whole).
        """
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
            return None
        rate = info.samplerate
        samples = info.frames * SAMPLE_RATE // rate if info.frames > 0 else 0
        starts, chunk = self._window_starts(samples, opts)
        if len(starts) == 1:
            return None
        pieces: list[tuple[int, torch.Tensor]] = []
        speech = torch.zeros(samples // SPEECH_HOP + 1, dtype=torch.bool)
        try:
            with sf.SoundFile(str(path)) as f:
                for b in range(0, len(starts), opts.batch_size):
                    windows = []
                    for start in starts[b: b + opts.batch_size]:
                        first = start * rate // SAMPLE_RATE
                        f.seek(first)
                        data = f.read(-(-(start + chunk) * rate // SAMPLE_RATE) - first, dtype="float32",
                                      always_2d=True)
                        wave = to_mono_16k(data, rate, path, min_duration=0.0)[:chunk]
                        windows.append(_Window(0, start, wave))
                        active = speech_frames(wave)[: len(speech) - start // SPEECH_HOP]
                        speech[start // SPEECH_HOP: start // SPEECH_HOP + len(active)] |= active
                    pieces += [(w.start, lp) for w, lp in zip(windows, self._window_posteriors(windows, len(windows)))]
        except (sf.LibsndfileError, RuntimeError):  # damaged past its header: read_audio_file says how
            return None
        return self._stitch(pieces, opts), speech, samples / SAMPLE_RATE

    @overload
    def transcribe(self, audio: AudioInput, sample_rate: int | None = None, **options) -> Transcription: ...
    @overload
    def transcribe(self, audio: list[AudioInput], sample_rate: int | None = None, **options) -> list[Transcription]: ...

    def transcribe(self, audio, sample_rate=None, **options):
        """Transcribe a path, an array/tensor of samples (give `sample_rate`), or a list of them.

        Returns a Transcription (text, words with start/end seconds and confidence, duration), or a list.
        Options are the fields of TranscribeOptions (batch_size, chunk_seconds, ...) and of DecodingOptions
        (decoder, beam_size, lm_weight, hotwords, ...; the rest are the model's own). Files longer than a
        window are read window by window, so memory does not grow with their length.
        """
        opts, decoding = self.options(**options)
        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        results: list[Transcription | None] = [None] * len(items)
        loaded = []
        for k, item in enumerate(items):
            streamed = self._stream_file(item, opts) if isinstance(item, (str, os.PathLike)) else None
            if streamed is None:
                loaded.append((k, load_audio(item, sample_rate)))
            else:
                log_probs, speech, duration = streamed
                results[k] = self.decode_with(log_probs, duration, decoding, opts.speech_check, speech=speech)
        for (k, wave), log_probs in zip(loaded, self.posteriors([w for _, w in loaded], opts)):
            results[k] = self.decode_with(log_probs, len(wave) / SAMPLE_RATE, decoding, opts.speech_check, wave)
        return results[0] if single else results

    def stream(self, sample_rate: int = SAMPLE_RATE, **options) -> Streamer:
        """A Streamer for audio that arrives in chunks: `feed(samples)` and `finish()` return partial and final
        text with word times (see streaming.py). Options: the fields of DecodingOptions and of StreamOptions
        (endpoint_seconds, max_segment_seconds, speech_check). Needs a unidirectional model; runs torch."""
        return Streamer(self, sample_rate, **options)

    def options(self, **given) -> tuple[TranscribeOptions, DecodingOptions]:
        """TranscribeOptions from the given fields, and this model's DecodingOptions with the given fields
        replaced; an unknown name is an OptionsError that suggests the close ones."""
        for name in given:
            if name not in TRANSCRIBE_FIELDS and name not in DECODING_FIELDS:
                raise unknown_option(name, TRANSCRIBE_FIELDS + DECODING_FIELDS, "transcribe")
        return (TranscribeOptions(**{k: v for k, v in given.items() if k in TRANSCRIBE_FIELDS}),
                dataclasses.replace(self.decoding, **{k: v for k, v in given.items() if k in DECODING_FIELDS}))

    def decoder(self, options: DecodingOptions | None = None) -> Decoder:
        """The decoder for these options (default: the model's): greedy, or a (cached) beam search."""
        opts = options or self.decoding
        if opts.decoder == "greedy":
            return self._greedy
        key = json.dumps(opts.beam_settings(), sort_keys=True, default=str)
        if key not in self._beam_decoders:
            if len(self._beam_decoders) >= 8:
                self._beam_decoders.pop(next(iter(self._beam_decoders)))
            self._beam_decoders[key] = BeamSearchDecoder(self.vocab, self.lm if opts.lexicon else None, opts)
        return self._beam_decoders[key]

    def decode(self, log_probs: torch.Tensor, duration: float, wave: torch.Tensor | None = None,
               speech: torch.Tensor | None = None, **options) -> Transcription:
        """Text and words from one utterance's CTC log-probabilities, as `posteriors` gives them.

        With its 16 kHz `wave` (or its `speech_frames`), words where the audio has no speech-like sound are
        dropped (`speech_check`). Options as for `transcribe`.
        """
        opts, decoding = self.options(**options)
        return self.decode_with(log_probs, duration, decoding, opts.speech_check, wave, speech)

    def decode_with(self, log_probs: torch.Tensor, duration: float, decoding: DecodingOptions,
                    speech_check: bool = True, wave: torch.Tensor | None = None,
                    speech: torch.Tensor | None = None) -> Transcription:
        """`decode` with options already resolved by `options` (for loops over many utterances)."""
        emissions = log_probs[:, self.columns(decoding.decoder)]
        result = self.decoder(decoding).decode(emissions[None], torch.tensor([len(log_probs)]), self.frame_seconds)[0]
        result.duration = round(duration, 3)
        result.end_words_by(result.duration)
        if speech_check and speech is None and wave is not None:
            speech = speech_frames(wave)
        if speech_check and speech is not None:
            result = keep_spoken_words(result, speech, lookback_seconds=self.model.config.end_silence_seconds)
        return result

    @torch.no_grad()
    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """The model's log-mel features (mels, frames) of a 16 kHz waveform, before normalisation."""
        feats, _ = self.model.features.raw(wave[None].to(self.device), torch.tensor([len(wave)], device=self.device))
        return feats[0].float().cpu()


def quantize_int8(model: DeepSpeech2) -> DeepSpeech2:
    """The CPU model with its GRUs and linear layers replaced, in place, by dynamically quantized int8 ones
    (int8 weights; activations quantized per call, so results move by quantization noise)."""
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.GRU, nn.Linear}, dtype=torch.qint8, inplace=True)


def _asked_precision(precision: str | None) -> str:
    """The precision asked for (default $ASR_PRECISION, else "auto"), checked."""
    asked = precision or os.environ.get(PRECISION_ENV) or "auto"
    if asked not in PRECISIONS:
        source = "" if precision else f" (from ${PRECISION_ENV})"
        raise OptionsError(f"unknown precision {asked!r}{source}; choose one of {', '.join(PRECISIONS)}")
    return asked


def _network_precision(precision: str, device: torch.device, onnx: OnnxNetwork | None) -> str:
    """"int8" or "fp32" for an asked precision: "auto" is int8 where torch runs the network on the CPU, fp32
    elsewhere; int8 elsewhere is an OptionsError."""
    on_torch_cpu = device.type == "cpu" and onnx is None
    if precision == "auto":
        return "int8" if on_torch_cpu else "fp32"
    if precision == "int8" and not on_torch_cpu:
        where = f"on {device}" if onnx is None else "with the onnx backend (model.onnx)"
        raise OptionsError(f"precision int8 quantizes the torch network on the CPU; it cannot run {where}: "
                           "choose precision fp32 or auto, or device cpu with backend torch")
    return precision


def load_model(path: str | os.PathLike | None = None, device: str = "auto",
               lm: str | os.PathLike | None = None, backend: str | None = None,
               precision: str | None = None) -> ASRModel:
    """Load a model folder written by training (e.g. `exp/fsdd/best`).

    With no path: the folder named by the ASR_MODEL environment variable, else the English model that
    ships with the package. The language model for beam search is `lm`, else the model folder's own
    `lm/` (see `asr lm tune`); the beam settings tuned for it, and the decoder the model uses when none is asked
    for (beam + LM where tuning found it better than greedy, as for the shipped model), come from the folder's
    decoder.json; without one the model decodes greedily.
    `backend` ("auto", "onnx", "torch"; default $ASR_BACKEND or "auto"): on the CPU, "auto" runs the
    network with onnxruntime when the folder has an up-to-date model.onnx (`asr export`; the shipped model
    has one) and int8 is not asked for, else torch.
    `precision` ("auto", "int8", "fp32"; default $ASR_PRECISION or "auto"): "auto" is int8 (`quantize_int8`,
    about 1.9x faster for +0.06 WER points, bench/README.md) where torch runs the network on the CPU, else fp32
    (onnxruntime runs fp32 only).
    """
    if path is None:
        path = os.environ.get(DEFAULT_MODEL_ENV) or default_model_dir()
        if not path:
            raise FileNotFoundError(f"no model path given, ${DEFAULT_MODEL_ENV} is not set and this installation "
                                    "has no default model; train one with a recipe (see README) and pass its best/")
    path = Path(path)
    asked = _asked_precision(precision)
    model, vocab, meta = load_model_files(path, resolve_device(device))
    backend = resolve_backend(backend)
    if backend == "auto" and asked == "int8":  # only torch quantizes
        backend = "torch"
    onnx = load_onnx_network(path, backend, next(model.parameters()).device)
    precision = _network_precision(asked, next(model.parameters()).device, onnx)
    try:
        recover_dir(path / LM_DIR)  # a copy of lm/ interrupted between its two renames
    except OSError as e:
        raise CheckpointError(f"{path / LM_DIR}: an interrupted update left it in {LM_DIR}.old and it cannot be "
                              f"put back ({e})") from None
    if lm is None and (path / LM_DIR).is_dir():
        lm = path / LM_DIR
    if lm is None and (path / DECODER_FILE).is_file():
        raise CheckpointError(f"{path / DECODER_FILE} holds beam settings tuned with a language model, but "
                              f"{path / LM_DIR} is missing: run `asr lm tune` again, pass the LM (lm=..., --lm), or "
                              f"delete {DECODER_FILE} to use the model without one")
    language_model = LanguageModel.load(lm) if lm is not None else None
    decoding = None
    if (path / DECODER_FILE).is_file() and language_model is not None:
        try:
            tuned = json.loads((path / DECODER_FILE).read_text())
            decoding = DecodingOptions(decoder=tuned.get("decoder", "greedy"), **tuned["beam"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # OptionsError is a ValueError
            raise CheckpointError(f"{path / DECODER_FILE}: not valid decoder settings ({e})") from None
    if precision == "int8":
        model = quantize_int8(model)
    return ASRModel(model, vocab, meta, language_model, decoding, onnx, precision=precision)
