"""Manifests: JSON-lines or CSV lists of {audio_filepath, duration, text, id}, read, written and checked."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import soundfile as sf
import torch

from .audio import MIN_DURATION, SAMPLE_RATE, AudioError, check_audio_path, libsndfile_reason
from .errors import ASRError
from .files import replaced_atomically
from .text import Vocabulary

log = logging.getLogger(__name__)


class ManifestError(ASRError, ValueError):
    """A manifest that cannot be used; names the file and line."""


@dataclass
class Utterance:
    audio_filepath: str
    duration: float
    text: str
    id: str = ""
    line: int = field(default=0, compare=False, repr=False)  # where it is in its manifest (0: not from one)


def read_utf8(path: Path, error: type[ASRError]) -> str:
    """A text file's contents (a UTF-8 byte order mark is dropped); other bytes raise `error` naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[start]:#04x}); save the file as UTF-8") from None


def _check_entry(raw: dict, where: str, base: Path, line: int) -> Utterance:
    missing = [k for k in ("audio_filepath", "duration", "text") if k not in raw]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        duration = float(raw["duration"])
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: duration {raw['duration']!r} is not a number") from None
    if not math.isfinite(duration) or duration < 0:
        raise ManifestError(f"{where}: duration {duration} is not a non-negative number")
    path = str(raw["audio_filepath"])
    if not os.path.isabs(path):
        path = str(base / path)
    utt_id = str(raw.get("id") or Path(path).stem)
    return Utterance(path, duration, str(raw["text"]), utt_id, line)


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """Read a JSON-lines (NeMo style) or CSV manifest. Relative audio paths are relative to the manifest."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base = path.parent
    text = read_utf8(path, ManifestError)
    utterances = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for n, row in enumerate(reader, start=2):
            utterances.append(_check_entry(row, f"{path}:{n}", base, n))
    else:
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(raw, dict):
                raise ManifestError(f"{path}:{n}: expected a JSON object")
            utterances.append(_check_entry(raw, f"{path}:{n}", base, n))
    if not utterances:
        raise ManifestError(f"{path}: manifest has no utterances")
    return utterances


def write_manifest(utterances: Sequence[Utterance], path: str | os.PathLike) -> None:
    """Write a JSON-lines manifest atomically (audio paths made absolute, so it can be read from anywhere)."""
    with replaced_atomically(path) as (tmp,), open(tmp, "w", encoding="utf-8") as f:
        for u in utterances:
            f.write(json.dumps({"audio_filepath": os.path.abspath(u.audio_filepath), "duration": round(u.duration, 4),
                                "text": u.text, "id": u.id}) + "\n")


def filter_by_duration(utterances: list[Utterance], max_duration: float | None,
                       min_duration: float = 0.1) -> list[Utterance]:
    """Drop utterances that are too long to train on, or too short to produce a frame."""
    kept = [u for u in utterances
            if u.duration >= min_duration and (max_duration is None or u.duration <= max_duration)]
    if len(kept) < len(utterances):
        log.info("dropped %d of %d utterances outside %.2f-%s s", len(utterances) - len(kept),
                 len(utterances), min_duration, max_duration)
    return kept


def _header_problem(path: Path) -> str | None:
    """Why libsndfile (or else ffprobe, when installed) finds no audio header in a file; None if one does."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        reason = f"libsndfile: {libsndfile_reason(e)}"
        if shutil.which("ffprobe") is None:
            return f"no readable audio header ({reason})"
        probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries",
                                "stream=codec_name", "-of", "csv=p=0", str(path)], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip():
            return None  # decoded with ffmpeg
        return f"no readable audio header ({reason}; ffprobe finds no audio stream)"
    if info.frames <= 0:
        return "audio is empty (no samples)"
    if info.frames / info.samplerate < MIN_DURATION:
        return f"audio is too short ({info.frames / info.samplerate:.3f} s; at least {MIN_DURATION} s is needed)"
    return None


def _audio_problem(utt: Utterance) -> str | None:
    """Why an utterance's audio cannot be used, seen from the file system and the file's header (not decoded)."""
    try:
        return _header_problem(check_audio_path(utt.audio_filepath))
    except AudioError as e:
        return e.problem


def _listed(problems: list[str], shown: int) -> str:
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def check_audio_files(utterances: Sequence[Utterance], manifest: str | os.PathLike, workers: int = 16,
                      shown: int = 5) -> None:
    """Raise ManifestError with the first `shown` lines (and the count) whose audio is missing, not a file,
    empty or without a readable header. Headers are read in parallel threads; nothing is decoded."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(_audio_problem, utterances))
    bad = [f"line {u.line}: {u.audio_filepath}: {p}" for u, p in zip(utterances, problems) if p]
    if bad:
        raise ManifestError(f"{manifest}: {len(bad)} of {len(utterances)} utterances have unusable audio: "
                            f"{_listed(bad, shown)}")


def drop_untrainable(utterances: list[Utterance], vocab: Vocabulary,
                     output_frames: Callable[[torch.Tensor], torch.Tensor], speed: float = 1.0,
                     shown: int = 5) -> tuple[list[Utterance], str]:
    """The utterances CTC can learn from, and the first `shown` others with why ("" if none): a transcript that
    normalises to nothing, or audio (played `speed` times faster) with fewer model output frames than its
    transcript needs (one per token, plus a blank between repeated tokens)."""
    samples = torch.tensor([int(u.duration / speed * SAMPLE_RATE) for u in utterances], dtype=torch.long)
    frames = output_frames(samples).tolist()
    kept, dropped = [], []
    for utt, n in zip(utterances, frames):
        ids = vocab.encode(utt.text)
        needed = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))
        if not ids:
            dropped.append(f"line {utt.line}: text {utt.text!r} is empty after normalisation")
        elif n < needed:
            dropped.append(f"line {utt.line}: {utt.duration:.2f} s gives {n} output frames, its transcript "
                           f"needs {needed}")
        else:
            kept.append(utt)
    return kept, _listed(dropped, shown)
