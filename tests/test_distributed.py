"""Data-parallel training: two gloo processes under torchrun take the same steps as one process."""

import csv
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from asr.data import BucketBatchSampler

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


def _train(args: list[str], out, env) -> list[dict]:
    subprocess.run(args + ["train", "--train", str(env["CORPUS"]), "--dev", str(env["CORPUS"]), "--out", str(out),
                           "--no-progress", *env["OVERRIDES"]], check=True, env=env["ENV"], timeout=600,
                   capture_output=True)
    return list(csv.DictReader(open(out / "train_log.csv")))


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
