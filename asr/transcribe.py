"""The public inference API: `load_model(path)` -> `ASRModel.transcribe(audio)`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, overload

import torch

from .audio import SAMPLE_RATE, AudioInput, load_audio
from .beam_search import BeamSearchDecoder, BeamSearchOptions
from .checkpoint import DECODER_FILE, LM_DIR, CheckpointError, load_model_files
from .decoding import Transcription, greedy_decode
from .device import resolve_device
from .lm import LanguageModel
from .model import DeepSpeech2
from .onnx_export import OnnxNetwork, load_onnx_network
from .packaging import default_model_dir
from .text import Vocabulary

DEFAULT_MODEL_ENV = "ASR_MODEL"


@dataclass
class TranscribeOptions:
    decoder: str = "greedy"  # "greedy" | "beam"
    batch_size: int = 16  # windows decoded together
    chunk_seconds: float = 30.0  # longer audio is cut into overlapping windows of this length
    overlap_seconds: float = 4.0  # half of the overlap is trusted from each side when stitching
    # beam search: None takes the model's tuned value (decoder.json) or BeamSearchOptions' default
    beam_size: int | None = None
    lm_weight: float | None = None
    word_score: float | None = None
    lexicon: bool | None = None
    hotwords: list[str] = field(default_factory=list)
    hotword_weight: float | None = None


@dataclass
class _Window:
    item: int
    start: int  # sample offset into the item
    wave: torch.Tensor


class ASRModel:
    """A trained recognizer: weights, vocabulary and settings, ready to transcribe."""

    def __init__(self, model: DeepSpeech2, vocab: Vocabulary, meta: dict | None = None,
                 lm: LanguageModel | None = None, beam_options: BeamSearchOptions | None = None,
                 onnx: OnnxNetwork | None = None):
        self.model = model.eval()
        self.onnx = onnx  # when set, onnxruntime runs the network after the (torch) features
        self.vocab = vocab
        self.meta = meta or {}
        self.lm = lm
        # the model's beam defaults: lexicon search when there is an LM, else any spelling
        self.beam_options = beam_options or BeamSearchOptions(lexicon=lm is not None)
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
            return self.model(waves.to(self.device), lengths.to(self.device))
        return self.onnx(*self.model.features(waves, lengths))

    @property
    def frame_seconds(self) -> float:
        return self.model.config.frame_seconds

    def _samples_per_frame(self) -> int:
        return self.model.config.features.hop_length * self.model.config.time_stride

    def _windows(self, item: int, wave: torch.Tensor, opts: TranscribeOptions) -> list[_Window]:
        per_frame = self._samples_per_frame()
        chunk = int(opts.chunk_seconds * SAMPLE_RATE) // per_frame * per_frame
        overlap = int(opts.overlap_seconds * SAMPLE_RATE) // per_frame * per_frame
        if chunk <= overlap or overlap < 0:
            raise ValueError("chunk_seconds must be longer than overlap_seconds (and overlap >= 0)")
        if len(wave) <= chunk:
            return [_Window(item, 0, wave)]
        starts = list(range(0, len(wave) - overlap, chunk - overlap))
        return [_Window(item, s, wave[s: s + chunk]) for s in starts]

    @torch.no_grad()
    def posteriors(self, waves: Sequence[torch.Tensor], options: TranscribeOptions | None = None
                   ) -> list[torch.Tensor]:
        """CTC log-probabilities (frames, vocab) per 16 kHz waveform, long ones windowed and stitched."""
        opts = options or TranscribeOptions()
        windows = [w for i, wave in enumerate(waves) for w in self._windows(i, wave, opts)]
        order = sorted(range(len(windows)), key=lambda k: len(windows[k].wave))
        outputs: list[torch.Tensor | None] = [None] * len(windows)
        for b in range(0, len(order), opts.batch_size):
            idx = order[b: b + opts.batch_size]
            lengths = torch.tensor([len(windows[k].wave) for k in idx])
            batch = torch.zeros(len(idx), int(lengths.max()))
            for row, k in enumerate(idx):
                batch[row, : lengths[row]] = windows[k].wave
            log_probs, out_lengths = self._network(batch, lengths)
            for row, k in enumerate(idx):
                outputs[k] = log_probs[row, : out_lengths[row]].cpu()
        per_frame = self._samples_per_frame()
        half_overlap = int(opts.overlap_seconds * SAMPLE_RATE) // per_frame // 2
        stitched = []
        for i in range(len(waves)):
            mine = [(w, outputs[k]) for k, w in enumerate(windows) if w.item == i]
            pieces = []
            for j, (w, lp) in enumerate(mine):
                first = 0 if j == 0 else half_overlap
                last = len(lp) if j == len(mine) - 1 else (mine[j + 1][0].start - w.start) // per_frame + half_overlap
                pieces.append(lp[first:last])
            stitched.append(torch.cat(pieces))
        return stitched

    @overload
    def transcribe(self, audio: AudioInput, sample_rate: int | None = None, **options) -> Transcription: ...
    @overload
    def transcribe(self, audio: list[AudioInput], sample_rate: int | None = None, **options) -> list[Transcription]: ...

    def transcribe(self, audio, sample_rate=None, **options):
        """Transcribe a path, an array/tensor of samples (give `sample_rate`), or a list of them.

        Returns a Transcription (text, words with start/end seconds and confidence, duration), or a list.
        Options are the fields of TranscribeOptions (decoder, batch_size, chunk_seconds, overlap_seconds).
        """
        opts = TranscribeOptions(**options)
        self._check_decoder(opts.decoder)
        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        waves = [load_audio(a, sample_rate) for a in items]
        results = [self.decode(lp, len(wave) / SAMPLE_RATE, opts) for wave, lp in zip(waves, self.posteriors(waves, opts))]
        return results[0] if single else results

    @property
    def decoders(self) -> tuple[str, ...]:
        """The decoder names this model can use ("beam" searches with its LM when it has one)."""
        return ("greedy", "beam")

    def beam_search_options(self, options: TranscribeOptions) -> BeamSearchOptions:
        """The model's beam settings with the call's overrides."""
        given = {f.name: getattr(options, f.name) for f in dataclasses.fields(BeamSearchOptions)
                 if hasattr(options, f.name) and getattr(options, f.name) not in (None, [])}
        return dataclasses.replace(self.beam_options, **given)

    def beam_decoder(self, options: BeamSearchOptions) -> BeamSearchDecoder:
        """A (cached) beam search decoder for these settings."""
        key = json.dumps(dataclasses.asdict(options), sort_keys=True, default=str)
        if key not in self._beam_decoders:
            if len(self._beam_decoders) >= 8:
                self._beam_decoders.pop(next(iter(self._beam_decoders)))
            self._beam_decoders[key] = BeamSearchDecoder(self.vocab, self.lm if options.lexicon else None, options)
        return self._beam_decoders[key]

    def _check_decoder(self, name: str) -> None:
        if name not in self.decoders:
            raise ValueError(f"unknown decoder {name!r}; available: {', '.join(map(repr, self.decoders))}")

    def decode(self, log_probs: torch.Tensor, duration: float, options: TranscribeOptions | None = None
               ) -> Transcription:
        """Text and words from one utterance's CTC log-probabilities (frames, vocab), as `posteriors` gives."""
        opts = options or TranscribeOptions()
        self._check_decoder(opts.decoder)
        lengths = torch.tensor([len(log_probs)])
        if opts.decoder == "beam":
            decoder = self.beam_decoder(self.beam_search_options(opts))
            result = decoder.decode(log_probs[None], lengths, self.frame_seconds)[0]
        else:
            result = greedy_decode(log_probs[None], lengths, self.vocab, self.frame_seconds)[0]
        result.duration = round(duration, 3)
        for w in result.words:
            w.end = min(w.end, result.duration)
        return result

    @torch.no_grad()
    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """The model's log-mel features (mels, frames) of a 16 kHz waveform, before normalisation."""
        feats, _ = self.model.features.raw(wave[None].to(self.device), torch.tensor([len(wave)], device=self.device))
        return feats[0].float().cpu()


def load_model(path: str | os.PathLike | None = None, device: str = "auto",
               lm: str | os.PathLike | None = None, backend: str | None = None) -> ASRModel:
    """Load a model folder written by training (e.g. `exp/fsdd/best`).

    With no path: the folder named by the ASR_MODEL environment variable, else the English model that
    ships with the package. The language model for beam search is `lm`, else the model folder's own
    `lm/` (see `asr lm tune`); the beam settings tuned for it come from the folder's decoder.json.
    `backend` ("auto", "onnx", "torch"; default $ASR_BACKEND or "auto"): on the CPU, "auto" runs the
    network with onnxruntime when the folder has an up-to-date model.onnx (`asr export`), else torch.
    """
    if path is None:
        path = os.environ.get(DEFAULT_MODEL_ENV) or default_model_dir()
        if not path:
            raise FileNotFoundError(f"no model path given, ${DEFAULT_MODEL_ENV} is not set and this installation "
                                    "has no default model; train one with a recipe (see README) and pass its best/")
    path = Path(path)
    model, vocab, meta = load_model_files(path, resolve_device(device))
    onnx = load_onnx_network(path, backend, next(model.parameters()).device)
    if lm is None and (path / LM_DIR).is_dir():
        lm = path / LM_DIR
    language_model = LanguageModel.load(lm) if lm is not None else None
    beam = None
    if (path / DECODER_FILE).is_file() and language_model is not None:
        try:
            beam = BeamSearchOptions(**json.loads((path / DECODER_FILE).read_text())["beam"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / DECODER_FILE}: not valid decoder settings ({e})") from None
    return ASRModel(model, vocab, meta, language_model, beam, onnx)
