"""Audio input: any common file or array -> 16 kHz mono float32, with one clear error type."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000
MIN_DURATION = 0.1  # seconds; shorter clips cannot give the model a frame to work with

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, non-finite or too short. Names the source."""

    def __init__(self, source: object, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


def _read_with_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    """Decode with the ffmpeg program (for what libsndfile cannot read, e.g. m4a or some mp3s)."""
    if shutil.which("ffmpeg") is None:
        raise AudioError(path, "libsndfile cannot read this format and ffmpeg is not installed")
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1",
           "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(path, f"not readable as audio ({reason[-1] if reason else 'ffmpeg failed'})")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy(), SAMPLE_RATE


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a file as float32 samples of shape (frames, channels) and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        data, rate = _read_with_ffmpeg(path)
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
