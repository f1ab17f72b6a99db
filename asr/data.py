"""Manifests (read, written, checked), the training Dataset (augmented), a length-bucketed SortaGrad batch
sampler and padding collate."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import soundfile as sf
import torch
from torch.utils.data import Dataset, Sampler

from .audio import MIN_DURATION, SAMPLE_RATE, AudioError, check_audio_path, libsndfile_reason, load_audio
from .augment import Augmenter, AugmentOptions
from .config import ConfigError
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


@dataclass
class Unreadable:
    """A dataset item whose audio failed to load (passed out of loader workers, where exceptions get mangled)."""

    source: str
    problem: str

    def error(self) -> AudioError:
        return AudioError(self.source, self.problem)


class SpeechDataset(Dataset):
    """Returns (waveform, token ids, id), augmented on the fly when `augment` asks for it.

    Babble is made from other utterances of the same dataset.
    """

    def __init__(self, utterances: list[Utterance], vocab: Vocabulary, augment: AugmentOptions | None = None):
        self.utterances = utterances
        self.vocab = vocab
        augment = augment or AugmentOptions()
        self.augmenter = Augmenter(augment, SAMPLE_RATE, self._random_other) if augment.active else None

    def _random_other(self) -> torch.Tensor:
        # torch's RNG: seeded per loader worker from the (checkpointed) main-process state
        return load_audio(self.utterances[int(torch.randint(len(self.utterances), ()))].audio_filepath)

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str] | Unreadable:
        """(waveform, token ids, id), or Unreadable when its audio (or a babble source's) fails to load."""
        utt = self.utterances[index]
        try:
            wave = load_audio(utt.audio_filepath)
            if self.augmenter is not None:
                wave = self.augmenter(wave)
        except AudioError as e:
            return Unreadable(e.source, e.problem)
        return wave, torch.tensor(self.vocab.encode(utt.text), dtype=torch.long), utt.id


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, str] | Unreadable]) -> dict:
    """Pad waveforms and targets into a batch dict; items that failed to load are listed in "unreadable"."""
    items = [b for b in batch if not isinstance(b, Unreadable)]
    waves, targets, ids = [w for w, _, _ in items], [t for _, t, _ in items], [i for _, _, i in items]
    wave_lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    padded = torch.zeros(len(waves), max((len(w) for w in waves), default=0))
    for i, w in enumerate(waves):
        padded[i, : len(w)] = w
    return {
        "waves": padded,
        "wave_lengths": wave_lengths,
        "targets": torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
        "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long),
        "ids": ids,
        "unreadable": [b for b in batch if isinstance(b, Unreadable)],
    }


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances whose padded size stays under `max_batch_seconds`.

    Deterministic for a (seed, epoch). With SortaGrad the first epoch runs shortest-first;
    later epochs shuffle within length buckets and shuffle the batch order. Batches are sharded
    across `num_replicas` ranks: rank r takes batches r, r + num_replicas, ... of the one global
    order, and every rank gets the same number, a multiple of `group_size` (the batches that one
    optimiser step accumulates). `start_batch` skips batches already done in the epoch (resuming).
    """

    def __init__(self, durations: Sequence[float], max_batch_seconds: float, max_batch_size: int = 256,
                 num_buckets: int = 20, shuffle: bool = True, sortagrad: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, group_size: int = 1):
        if max_batch_seconds <= 0:
            raise ValueError("max_batch_seconds must be positive")
        if not 0 <= rank < num_replicas or group_size < 1:
            raise ValueError(f"need 0 <= rank < num_replicas and group_size >= 1 (rank {rank}, "
                             f"num_replicas {num_replicas}, group_size {group_size})")
        self.durations = list(durations)
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.sortagrad = sortagrad
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.group_size = group_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _pack(self, order: list[int]) -> list[list[int]]:
        batches, batch, longest = [], [], 0.0
        for i in order:
            d = self.durations[i]
            new_longest = max(longest, d)
            if batch and (new_longest * (len(batch) + 1) > self.max_batch_seconds
                          or len(batch) >= self.max_batch_size):
                batches.append(batch)
                batch, new_longest = [], d
            batch.append(i)
            longest = new_longest
        if batch:
            batches.append(batch)
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of this rank for `epoch` (default: the current one), before skipping."""
        epoch = self.epoch if epoch is None else epoch
        rng = random.Random(self.seed * 1_000_003 + epoch)
        by_length = sorted(range(len(self.durations)), key=lambda i: self.durations[i])
        if not self.shuffle or (self.sortagrad and epoch == 0):
            batches = self._pack(by_length)
        else:
            batches = []
            target, start = math.ceil(len(by_length) / self.num_buckets), 0
            while start < len(by_length):  # similar lengths, fresh company each epoch
                end = min(len(by_length), start + target)
                # a bucket holds at least one full batch of its longest utterance
                longest = self.durations[by_length[end - 1]]
                capacity = min(self.max_batch_size, max(1, int(self.max_batch_seconds // longest)))
                end = min(len(by_length), max(end, start + capacity))
                bucket = by_length[start:end]
                rng.shuffle(bucket)
                batches.extend(self._pack(bucket))
                start = end
            rng.shuffle(batches)
        per_rank = len(batches) // self.num_replicas // self.group_size * self.group_size
        if per_rank == 0 and batches:
            raise ConfigError(f"{len(batches)} batches cannot give each of {self.num_replicas} rank(s) "
                              f"{self.group_size} batch(es) (train.grad_accumulation): lower "
                              "data.max_batch_seconds or train.grad_accumulation")
        return batches[self.rank: per_rank * self.num_replicas: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_batch:]

    def __len__(self) -> int:
        return len(self.batches()) - self.start_batch
