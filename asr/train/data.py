"""The training Dataset (augmented on the fly), a length-bucketed SortaGrad batch sampler and padding collate."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..audio import SAMPLE_RATE, AudioError, load_audio, pad_waves
from ..augment import Augmenter, AugmentOptions
from ..config import ConfigError
from ..manifest import Utterance
from ..text import Vocabulary


@dataclass
class Unreadable:
    """A dataset item whose audio failed to load (passed out of loader workers, where exceptions get mangled)."""

    source: str
    problem: str

    def error(self) -> AudioError:
        return AudioError(self.source, self.problem)


class SpeechDataset(Dataset):
    """Returns (waveform, token ids, id), augmented on the fly when `augment` asks for it; with `word_pieces`
    (a second output layer's vocabulary) its token ids too, after the id.

    Babble is made from other utterances of the same dataset.
    """

    def __init__(self, utterances: list[Utterance], vocab: Vocabulary, augment: AugmentOptions | None = None,
                 word_pieces: Vocabulary | None = None):
        self.utterances = utterances
        self.vocab = vocab
        self.word_pieces = word_pieces
        augment = augment or AugmentOptions()
        self.augmenter = Augmenter(augment, SAMPLE_RATE, self._random_other) if augment.active else None

    def _random_other(self) -> torch.Tensor:
        # torch's RNG: seeded per loader worker from the (checkpointed) main-process state
        return load_audio(self.utterances[int(torch.randint(len(self.utterances), ()))].audio_filepath)

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> tuple | Unreadable:
        """(waveform, token ids, id[, word piece ids]), or Unreadable when its audio (or a babble source's) fails
        to load."""
        utt = self.utterances[index]
        try:
            wave = load_audio(utt.audio_filepath)
            if self.augmenter is not None:
                wave = self.augmenter(wave)
        except AudioError as e:
            return Unreadable(e.source, e.problem)
        item = wave, torch.tensor(self.vocab.encode(utt.text), dtype=torch.long), utt.id
        if self.word_pieces is not None:
            item += (torch.tensor(self.word_pieces.encode(utt.text), dtype=torch.long),)
        return item


def _joined(targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC's concatenated targets and their lengths."""
    joined = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return joined, torch.tensor([len(t) for t in targets], dtype=torch.long)


def collate(batch: list[tuple | Unreadable]) -> dict:
    """Pad waveforms and targets into a batch dict; items that failed to load are listed in "unreadable"; word
    piece targets, where the items have them, as "piece_targets" and "piece_target_lengths"."""
    items = [b for b in batch if not isinstance(b, Unreadable)]
    padded, wave_lengths = pad_waves([item[0] for item in items])
    targets, target_lengths = _joined([item[1] for item in items])
    collated = {
        "waves": padded,
        "wave_lengths": wave_lengths,
        "targets": targets,
        "target_lengths": target_lengths,
        "ids": [item[2] for item in items],
        "unreadable": [b for b in batch if isinstance(b, Unreadable)],
    }
    if items and len(items[0]) == 4:
        collated["piece_targets"], collated["piece_target_lengths"] = _joined([item[3] for item in items])
    return collated


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
