import json

import pytest
import torch

from asr.augment import AugmentOptions
from asr.manifest import ManifestError, Utterance, filter_by_duration, read_manifest, write_manifest
from asr.text import Vocabulary
from asr.train.data import BucketBatchSampler, SpeechDataset, collate


def test_jsonl_and_csv_manifests(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"audio_filepath": "x.wav", "duration": 1.5, "text": "hi"}) + "\n\n"
        + json.dumps({"audio_filepath": "/abs/y.wav", "duration": 2, "text": "yo", "id": "u2"}) + "\n")
    utts = read_manifest(tmp_path / "a.jsonl")
    assert utts[0] == Utterance(str(tmp_path / "x.wav"), 1.5, "hi", "x")
    assert utts[1].audio_filepath == "/abs/y.wav" and utts[1].id == "u2"
    (tmp_path / "b.csv").write_text("audio_filepath,duration,text\nx.wav,1.5,hi\n")
    assert read_manifest(tmp_path / "b.csv") == utts[:1]
    write_manifest(utts, tmp_path / "c.jsonl")
    assert read_manifest(tmp_path / "c.jsonl") == utts


@pytest.mark.parametrize("content, message", [
    ('{"audio_filepath": "x.wav", "text": "hi"}\n', r"bad\.jsonl:1: missing field\(s\) duration"),
    ('{"audio_filepath": "x.wav", "duration": "long", "text": "hi"}\n', r":1: duration 'long' is not a number"),
    ('{"audio_filepath": "x.wav", "duration": 1, "text": "hi"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
    ('[1, 2]\n', r":1: expected a JSON object"),
    ('\n', r"bad\.jsonl: manifest has no utterances"),
])
def test_manifest_errors_name_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path / "bad.jsonl")


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")


def test_duration_filter():
    utts = [Utterance("a", d, "x") for d in (0.05, 1.0, 10.0, 30.0)]
    assert [u.duration for u in filter_by_duration(utts, 20.0)] == [1.0, 10.0]


DURATIONS = [0.5 + (i * 37 % 23) / 4 for i in range(200)]


def test_sortagrad_first_epoch_is_shortest_first_and_bounded():
    sampler = BucketBatchSampler(DURATIONS, max_batch_seconds=20, max_batch_size=8, seed=1)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    assert [DURATIONS[i] for i in flat] == sorted(DURATIONS)
    for b in batches:
        assert len(b) <= 8 and max(DURATIONS[i] for i in b) * len(b) <= 20


def test_later_epochs_shuffle_deterministically_and_cover_everything():
    sampler = BucketBatchSampler(DURATIONS, max_batch_seconds=20, seed=1)
    sampler.set_epoch(1)
    one = list(sampler)
    assert sorted(i for b in one for i in b) == list(range(200))
    assert [DURATIONS[b[0]] for b in one] != sorted(DURATIONS[b[0]] for b in one)
    again = BucketBatchSampler(DURATIONS, max_batch_seconds=20, seed=1)
    again.set_epoch(1)
    assert list(again) == one
    sampler.set_epoch(2)
    assert list(sampler) != one
    for b in one:  # buckets keep lengths similar
        assert max(DURATIONS[i] for i in b) - min(DURATIONS[i] for i in b) <= 1.5


def test_resume_position_and_rank_sharding():
    sampler = BucketBatchSampler(DURATIONS, max_batch_seconds=20, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start_batch=5)
    assert list(sampler) == full[5:] and len(sampler) == len(full) - 5
    shards = []
    for rank in range(2):
        s = BucketBatchSampler(DURATIONS, max_batch_seconds=20, seed=3, num_replicas=2, rank=rank)
        s.set_epoch(4)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1])
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}


def test_dataset_and_collate(tone_corpus):
    utts = read_manifest(tone_corpus)[:3]
    ds = SpeechDataset(utts, Vocabulary())
    batch = collate([ds[i] for i in range(3)])
    lengths = batch["wave_lengths"]
    assert batch["waves"].shape == (3, int(lengths.max()))
    assert torch.all(batch["waves"][0, lengths[0]:] == 0)
    assert batch["target_lengths"].tolist() == [len(u.text) for u in utts]
    assert batch["targets"].numel() == sum(len(u.text) for u in utts)
    faster = SpeechDataset(utts, Vocabulary(), AugmentOptions(speed_perturb=[1.25]))[0][0]
    assert abs(len(faster) - len(ds[0][0]) / 1.25) <= 2
