"""Audio input: any common file or array -> 16 kHz mono float32, with one clear error type."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .errors import ASRError

SAMPLE_RATE = 16_000
MIN_DURATION = 0.1  # seconds; shorter clips cannot give the model a frame to work with

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class AudioError(ASRError, ValueError):
    """Audio that cannot be used: unreadable, empty, non-finite or too short. Names the source."""

    def __init__(self, source: object, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

    def __reduce__(self):  # picklable (e.g. out of a loader worker process) with both parts
        return type(self), (self.source, self.problem)


class AudioWarning(UserWarning):
    """Audio that was usable only in part (e.g. a truncated file: the decodable part is used)."""


def _read_with_ffmpeg(path: Path, reason: str) -> tuple[np.ndarray, int]:
    """Decode with the ffmpeg program (for what libsndfile cannot read, e.g. m4a or some mp3s)."""
    if shutil.which("ffmpeg") is None:
        raise AudioError(path, f"not an audio file that libsndfile can read ({reason}); for other formats "
                               "(m4a, webm, ...) install ffmpeg")
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1",
           "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(path, f"not readable as audio ({lines[-1] if lines else 'ffmpeg failed'})")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy(), SAMPLE_RATE


def libsndfile_reason(error: Exception) -> str:
    """libsndfile's own words without the "Error opening 'path': " prefix."""
    reason = str(error).split(": ", 1)[-1].strip().rstrip(".")
    if "possibly a pipe" in reason:  # what it says of a regular file whose format it does not know (e.g. .mp3)
        return "Format not recognised"
    return reason


def _ogg_stream_ended(path: Path) -> bool:
    """Whether an Ogg file's last page carries the end-of-stream flag (a cut file's does not)."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 65_536))
        tail = f.read()
    page = tail.rfind(b"OggS")
    return page >= 0 and len(tail) > page + 5 and bool(tail[page + 5] & 0x04)


def _read_blocks(path: Path, channels: int) -> tuple[np.ndarray, str]:
    """The samples that decode, block by block from a fresh handle, and libsndfile's reason for stopping."""
    blocks, problem = [], ""
    try:
        with sf.SoundFile(str(path)) as f:
            while len(block := f.read(8_192, dtype="float32", always_2d=True)):
                blocks.append(block)
    except (sf.LibsndfileError, RuntimeError) as e:
        problem = libsndfile_reason(e)
    return (np.concatenate(blocks) if blocks else np.zeros((0, channels), np.float32)), problem


def check_audio_path(path: str | os.PathLike) -> Path:
    """The path, if it names a non-empty file; AudioError saying what it is otherwise."""
    path = Path(path)
    if path.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if not path.exists():
        raise AudioError(path, "file not found")
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    return path


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a file as float32 samples of shape (frames, channels) and its sample rate.

    A file cut short (truncated FLAC, Ogg without its last page) gives the part that decodes and an
    AudioWarning; one with nothing decodable raises AudioError.
    """
    path = check_audio_path(path)
    try:
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        return _read_with_ffmpeg(path, libsndfile_reason(e))
    with f:
        rate, expected, kind, channels = f.samplerate, f.frames, f.format, f.channels
        try:
            data, problem = f.read(dtype="float32", always_2d=True), ""
        except (sf.LibsndfileError, RuntimeError):  # damaged: keep what decodes
            data, problem = _read_blocks(path, channels)
    if not problem and kind == "OGG" and not _ogg_stream_ended(path):
        problem = "the Ogg stream has no end page"
    if not problem and 0 < expected and len(data) < expected:
        problem = f"{len(data)} of the {expected} samples its header announces"
    if problem:
        if not len(data):
            raise AudioError(path, f"truncated or corrupt {kind} file: nothing decodes ({problem})")
        warnings.warn(AudioWarning(f"{path}: truncated or corrupt {kind} file ({problem}); using the "
                                   f"{len(data) / rate:.2f} s that decode"), stacklevel=2)
    return data, rate


def to_mono_16k(samples: np.ndarray | torch.Tensor, sample_rate: int, source: object = "<array>",
                min_duration: float = MIN_DURATION) -> torch.Tensor:
    """Check and convert samples (time,), (time, channels) or (channels, time) to 16 kHz mono."""
    wave = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
    if not (wave.is_floating_point() or wave.dtype in (torch.int16, torch.int32)):
        raise AudioError(source, f"unsupported sample type {wave.dtype}")
    if wave.dtype == torch.int16:
        wave = wave.float() / 32768.0
    elif wave.dtype == torch.int32:
        wave = wave.float() / 2147483648.0
    wave = wave.float()
    if wave.numel() == 0:
        raise AudioError(source, "audio is empty (no samples)")
    if wave.ndim == 2:  # average channels; the longer axis is time
        wave = wave.mean(dim=1 if wave.shape[0] >= wave.shape[1] else 0)
    elif wave.ndim != 1:
        raise AudioError(source, f"expected 1-D or 2-D samples, got shape {tuple(wave.shape)}")
    if not torch.isfinite(wave).all():
        raise AudioError(source, "audio contains NaN or infinite samples")
    if sample_rate <= 0:
        raise AudioError(source, f"invalid sample rate {sample_rate}")
    if wave.numel() / sample_rate < min_duration:
        raise AudioError(source, f"audio is too short ({wave.numel() / sample_rate:.3f} s; "
                                 f"at least {min_duration} s is needed)")
    if sample_rate != SAMPLE_RATE:
        wave = AF.resample(wave, sample_rate, SAMPLE_RATE)
    return wave.contiguous()


def load_audio(source: AudioInput, sample_rate: int | None = None,
               min_duration: float = MIN_DURATION) -> torch.Tensor:
    """Load a path, or take an array with its `sample_rate`, as a 16 kHz mono float32 tensor."""
    if isinstance(source, (str, os.PathLike)):
        data, rate = read_audio_file(source)
        return to_mono_16k(data, rate, source, min_duration)
    if sample_rate is None:
        raise AudioError("<array>", "sample_rate is required when passing samples instead of a path")
    return to_mono_16k(source, sample_rate, "<array>", min_duration)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (cheap; decodes with ffmpeg only as a fallback)."""
    try:
        info = sf.info(str(path))
        if info.frames > 0:
            return info.frames / info.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        pass
    return len(load_audio(path, min_duration=0.0)) / SAMPLE_RATE


def pad_waves(waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms of any lengths -> a zero-padded batch (batch, samples) and their lengths."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    batch = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0)
    for row, w in enumerate(waves):
        batch[row, : len(w)] = w
    return batch, lengths
