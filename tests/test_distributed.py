"""Data-parallel training: two gloo processes under torchrun take the same steps as one process."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import asr.train.trainer
from asr.config import ConfigError, load_config
from asr.train.data import BucketBatchSampler
from asr.train.distributed import DistributedContext
from asr.train.trainer import Trainer

from .conftest import TINY_OVERRIDES

DURATIONS = [0.5 + 0.1 * (i % 17) for i in range(60)]


def test_ranks_share_one_global_order_in_whole_groups():
    one = BucketBatchSampler(DURATIONS, max_batch_seconds=3, seed=1, group_size=2)
    ranks = [BucketBatchSampler(DURATIONS, max_batch_seconds=3, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        single = one.batches(epoch)
        sharded = [s.batches(epoch) for s in ranks]
        assert len(single) % 2 == 0 and len(sharded[0]) == len(sharded[1]) == len(single) // 2
        # global step k: batches 2k and 2k+1 in one process, batch k on each of the two ranks
        assert single[0::2] == sharded[0] and single[1::2] == sharded[1]


@pytest.fixture
def five_batches() -> list[float]:
    """Utterance lengths that pack into an odd number of batches: five of one utterance at 2 s a batch."""
    durations = [1.5, 1.2, 1.9, 1.0, 1.6]
    for epoch in (0, 1):  # sorted by length (SortaGrad), then shuffled within buckets
        assert len(BucketBatchSampler(durations, max_batch_seconds=2, seed=1).batches(epoch)) == 5
    return durations


@pytest.mark.parametrize("group_size", [1, 2])
def test_an_odd_batch_count_gives_both_ranks_as_many_whole_groups(five_batches, group_size):
    one = BucketBatchSampler(five_batches, max_batch_seconds=2, seed=1)
    ranks = [BucketBatchSampler(five_batches, max_batch_seconds=2, seed=1, num_replicas=2, rank=r,
                                group_size=group_size) for r in (0, 1)]
    for epoch in (0, 1):
        single = one.batches(epoch)
        sharded = [s.batches(epoch) for s in ranks]
        # two each, taken in turn from the one global order; the fifth batch sits this epoch out
        assert sharded[0] == single[0:4:2] and sharded[1] == single[1:4:2]
        for s in ranks:
            s.set_epoch(epoch)
            assert len(s) == len(list(s)) == 2


@pytest.mark.parametrize("replicas,group_size", [(2, 3), (6, 1)])
def test_too_few_batches_for_a_whole_group_on_every_rank_is_a_config_error(five_batches, replicas, group_size):
    sampler = BucketBatchSampler(five_batches, max_batch_seconds=2, num_replicas=replicas, group_size=group_size)
    with pytest.raises(ConfigError, match=rf"^5 batches cannot give each of {replicas} rank\(s\) {group_size} "
                                          r"batch\(es\) \(train.grad_accumulation\): lower data.max_batch_seconds"):
        sampler.batches(0)


def _rank_of_two(rank: int, monkeypatch) -> None:
    """Trainers built from now on take the part of `rank` of two processes (no process group is joined)."""
    monkeypatch.setattr(asr.train.trainer, "init_distributed",
                        lambda device: (DistributedContext(rank=rank, world_size=2), device))


def test_the_trainer_checks_that_two_ranks_can_share_the_batches(tone_corpus, tmp_path, monkeypatch):
    # the tone corpus at 1 s a batch: five batches an epoch, an odd number
    overrides = TINY_OVERRIDES + ["data.max_batch_seconds=1", "train.epochs=3"]
    config = load_config(None, overrides)
    trainers = []
    for rank in (0, 1):
        _rank_of_two(rank, monkeypatch)
        trainers.append(Trainer(config, tone_corpus, tone_corpus, tmp_path / "ok", progress=False))
    assert [len(t.sampler.batches(0)) for t in trainers] == [2, 2]
    assert not set(map(tuple, trainers[0].sampler.batches(0))) & set(map(tuple, trainers[1].sampler.batches(0)))
    assert [t.total_steps for t in trainers] == [6, 6]  # the same steps on both ranks: DDP's collectives match
    config = load_config(None, overrides + ["train.grad_accumulation=3"])
    with pytest.raises(ConfigError, match=r"5 batches cannot give each of 2 rank\(s\) 3 batch\(es\)"):
        Trainer(config, tone_corpus, tone_corpus, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()  # refused before anything is written


def _train(args: list[str], out, env) -> list[dict]:
    run = subprocess.run(args + ["train", "--train", str(env["CORPUS"]), "--dev", str(env["CORPUS"]), "--out",
                                 str(out), "--no-progress", *env["OVERRIDES"]], env=env["ENV"], timeout=600,
                         capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(run.args[:6])} ... exited {run.returncode}:\n{run.stderr[-6000:]}"
    return list(csv.DictReader(open(out / "train_log.csv")))


@pytest.mark.slow
def test_two_processes_match_one_process_accumulating_their_batches(tone_corpus, tmp_path):
    # no dropout, SpecAugment or audio augmentation: every random draw would differ between the runs
    overrides = TINY_OVERRIDES + ["train.epochs=3", "data.max_batch_seconds=1", "train.log_every_steps=1",
                                  "train.eval_every_steps=0", "train.seed=5"]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {"CORPUS": tone_corpus, "OVERRIDES": overrides, "ENV": run_env}
    one = _train([sys.executable, "-m", "asr.cli"], tmp_path / "one", {**env, "OVERRIDES": overrides +
                                                                      ["train.grad_accumulation=2"]})
    two = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "asr.cli"], tmp_path / "two", env)
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 6
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm"):  # Adam hides a wrongly scaled gradient; the logged norm shows it
            assert abs(float(a[key]) - float(b[key])) <= 1e-3 * float(a[key]) + 1e-4, (key, a, b)
        assert float(a["audio_sec_per_sec"]) > 0
    last = sorted((tmp_path / "one" / "checkpoints").iterdir())[-1].name
    w1 = load_file(str(tmp_path / "one" / "checkpoints" / last / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoints" / last / "model.safetensors"))
    # BatchNorm running statistics are rank 0's own under DDP; the learned weights must agree
    learned = [k for k in w1 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in learned:
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=1e-3), k
