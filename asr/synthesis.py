"""Synthetic training speech from text-to-speech engines: many voices, random speed and pitch.

Engines are the command-line programs `espeak-ng` (its English accents times its voice variants)
and `flite` (its built-in voices); Debian packages `espeak-ng` and `flite`. Generation is
parallel, deterministic for a seed (each file's settings derive from the seed and its own key,
not from the order of work) and resumable (files already written are kept).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .data import Utterance, write_manifest

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-029")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
                   "klatt3", "klatt4", "croak", "adam", "Alex", "Andy", "annie", "benjamin", "david", "ed", "john",
                   "linda", "max", "Mike", "paul", "quincy", "rob", "robert", "steph", "travis", "victor", "zac")
FLITE_VOICES = ("kal16", "awb", "rms", "slt")


class SynthesisError(RuntimeError):
    """A text-to-speech engine is missing or failed; the message says which and how to install it."""


@dataclass(frozen=True)
class Voice:
    engine: str  # "espeak-ng" | "flite"
    name: str  # espeak-ng: "accent+variant"; flite: voice name

    @property
    def id(self) -> str:
        return f"{self.engine}_{self.name}".replace("+", "_").replace("-", "")


def available_voices(engines: Sequence[str] = ("espeak-ng", "flite")) -> list[Voice]:
    """Every voice of the given engines that is installed here (an engine that is missing gives none)."""
    voices = []
    if "espeak-ng" in engines and shutil.which("espeak-ng"):
        voices += [Voice("espeak-ng", f"{a}+{v}") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
    if "flite" in engines and shutil.which("flite"):
        listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
        voices += [Voice("flite", v) for v in FLITE_VOICES if v in listed.split()]
    return voices


def require_engines(voices: Sequence[Voice]) -> None:
    if not voices:
        raise SynthesisError("no text-to-speech engine found: install Debian's espeak-ng and flite "
                             "(apt-get install espeak-ng flite; recipes/synthetic/install.sh does)")


@dataclass(frozen=True)
class SynthesisJob:
    key: str  # file name stem, unique
    text: str
    voice: Voice
    speed: float  # 1.0 = the engine's normal rate
    pitch: float  # espeak-ng: 0-99 (50 normal); flite: mean F0 in Hz


def _rng_for(seed: int, key: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16))


def plan_jobs(texts: Sequence[str], voices: Sequence[Voice], copies: int = 1, seed: int = 0,
              speed: tuple[float, float] = (0.8, 1.25), prefix: str = "syn") -> list[SynthesisJob]:
    """Every text in every voice, `copies` times, each with its own random speed and pitch."""
    jobs = []
    for t, text in enumerate(texts):
        for voice in voices:
            for c in range(copies):
                key = f"{prefix}{t:06d}_{voice.id}_{c}"
                rng = _rng_for(seed, key)
                male = voice.engine == "flite" and voice.name != "slt"
                pitch = rng.uniform(30, 75) if voice.engine == "espeak-ng" else (
                    rng.uniform(85, 140) if male else rng.uniform(160, 230))
                jobs.append(SynthesisJob(key, text, voice, round(rng.uniform(*speed), 3), round(pitch, 1)))
    return jobs


def _engine_command(job: SynthesisJob, wav: Path) -> list[str]:
    if job.voice.engine == "espeak-ng":
        return ["espeak-ng", "-v", job.voice.name, "-s", str(int(round(165 * job.speed))), "-p",
                str(int(round(job.pitch))), "-w", str(wav), job.text]
    if job.voice.engine == "flite":
        return ["flite", "-voice", job.voice.name, "--setf", f"duration_stretch={1 / job.speed:.3f}",
                "--setf", f"int_f0_target_mean={job.pitch}", "-t", job.text, "-o", str(wav)]
    raise SynthesisError(f"unknown engine {job.voice.engine!r}")


def trim_silence(wave: np.ndarray, sample_rate: int, threshold_db: float = -40.0, margin: float = 0.05
                 ) -> np.ndarray:
    """Cut leading and trailing stretches quieter than threshold_db below the peak (10 ms frames)."""
    frame = max(1, sample_rate // 100)
    n = len(wave) // frame
    if n == 0:
        return wave
    energy = (wave[: n * frame].reshape(n, frame) ** 2).mean(1)
    loud = np.nonzero(10 * np.log10(energy + 1e-12) > 10 * np.log10(energy.max() + 1e-12) + threshold_db)[0]
    if len(loud) == 0:
        return wave
    pad = int(margin * sample_rate)
    return wave[max(0, loud[0] * frame - pad): min(len(wave), (loud[-1] + 1) * frame + pad)]


def synthesize(job: SynthesisJob, out_dir: Path, sample_rate: int = 16_000) -> Utterance:
    """Run the engine for one job (unless its file exists) and return its manifest entry."""
    path = out_dir / f"{job.key}.flac"
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "out.wav"
            proc = subprocess.run(_engine_command(job, wav), capture_output=True, text=True, timeout=120)
            if proc.returncode != 0 or not wav.exists():
                raise SynthesisError(f"{job.voice.engine} failed for {job.key} ({job.text!r}): "
                                     f"{proc.stderr.strip()[:300]}")
            wave, rate = sf.read(wav, dtype="float32", always_2d=True)
        wave = trim_silence(wave.mean(1), rate)
        if rate != sample_rate:
            wave = AF.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
        wave = wave / max(1e-4, float(np.abs(wave).max())) * 0.5
        tmp_path = path.with_suffix(".tmp.flac")
        sf.write(tmp_path, wave, sample_rate)
        os.replace(tmp_path, path)  # a killed run never leaves a half-written file under the real name
    duration = sf.info(path).duration
    return Utterance(str(path), duration, job.text, job.key)


def build_corpus(jobs: Sequence[SynthesisJob], out_dir: str | os.PathLike, manifest: str | os.PathLike,
                 sample_rate: int = 16_000, workers: int | None = None,
                 progress: Callable | None = None) -> list[Utterance]:
    """Synthesise every job into out_dir (in parallel, skipping files already there) and write the manifest.

    `progress`, e.g. tqdm, wraps the stream of finished jobs (called with it and total=).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:  # the engines are separate processes: threads suffice
        results = pool.map(lambda j: synthesize(j, out, sample_rate), jobs)
        if progress is not None:
            results = progress(results, total=len(jobs))
        utterances = list(results)
    write_manifest(utterances, manifest)
    return utterances
