"""Training throughput: audio-seconds trained per second and peak memory, against a plain baseline.

    python bench/train_speed.py --config recipes/librispeech/ds2.yaml --manifest train.jsonl

Three measurements in one run, each over the same number of timed optimiser steps after warm-up:
- baseline: fp32, batches packed in random order (no length buckets, so much padding) under the
  same padded-seconds bound, waveforms generated in memory (no data loading);
- model-bound: the training configuration (bf16 autocast on CUDA, length-bucketed batches) on
  the same generated waveforms: the model's speed;
- input-bound: the same, but batches come from the real data pipeline (DataLoader workers
  decoding and augmenting the manifest's audio): whether loading keeps up.
Audio-seconds count real (unpadded) audio. Peak memory is the GPU's allocated peak during each
measurement; on the CPU it is the process's peak resident size so far (cumulative). Utterance lengths
come from the manifest (or, without one, a LibriSpeech-like spread of 2 to 17 s).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from asr.audio import SAMPLE_RATE
from asr.config import load_config
from asr.device import describe_machine, machine_line
from asr.files import write_text_atomically
from asr.manifest import Utterance, write_manifest
from asr.train.data import BucketBatchSampler, SpeechDataset, collate
from asr.train.trainer import Trainer

BASELINE = "baseline (fp32, random batches)"
MODEL_BOUND = "model-bound (generated batches)"
INPUT_BOUND = "input-bound (real data pipeline)"


def fake_manifest(path: Path, count: int = 4000, seed: int = 0) -> Path:
    """Utterance lengths only: every line names one short silent file (the trainer checks that audio exists), and
    the model-bound run never reads it: its batches are generated from the listed durations."""
    rng = random.Random(seed)
    silence = path.with_name("silence.wav")
    sf.write(silence, np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    utts = [Utterance(str(silence), round(rng.uniform(2, 17), 2), "the quick brown fox", f"u{i}")
            for i in range(count)]
    write_manifest(utts, path)
    return path


def generated_batch(durations: list[float], vocab_size: int, generator: torch.Generator) -> dict:
    """Noise waveforms of the given lengths, padded, with random targets of ~12 characters a second."""
    lengths = torch.tensor([int(d * SAMPLE_RATE) for d in durations])
    waves = 0.1 * torch.randn(len(durations), int(lengths.max()), generator=generator)
    waves *= (torch.arange(waves.shape[1])[None] < lengths[:, None])
    target_lengths = torch.tensor([max(1, int(d * 12)) for d in durations])
    targets = torch.randint(1, vocab_size, (int(target_lengths.sum()),), generator=generator)
    return {"waves": waves, "wave_lengths": lengths, "targets": targets, "target_lengths": target_lengths,
            "ids": [str(i) for i in range(len(durations))], "unreadable": []}


def measure(trainer: Trainer, batches, steps: int, warmup: int) -> dict:
    """Time `steps` optimiser steps after `warmup` untimed ones; audio-seconds per second, peak memory."""
    device = trainer.device
    trainer.model.train()
    batches = iter(batches)
    for _ in range(warmup):
        trainer.train_step([next(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    audio = padded = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        metrics = trainer.train_step([batch])  # reads the loss back: the step has finished
        audio += metrics["audio_seconds"]
        padded += batch["waves"].numel() / SAMPLE_RATE
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"audio_sec_per_sec": audio / elapsed, "padding": 1 - audio / padded, "step_seconds": elapsed / steps,
            "peak_memory_gib": peak / 2 ** 30}


def endless(sampler: BucketBatchSampler, make):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from make(sampler)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/librispeech/ds2.yaml")
    parser.add_argument("--manifest", help="real training manifest (for utterance lengths and the input-bound run)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    tmp = Path(tempfile.mkdtemp(prefix="asr-bench-"))
    manifest = Path(args.manifest) if args.manifest else fake_manifest(tmp / "fake.jsonl")
    results = {"command": " ".join(["python", *sys.argv]), "config": args.config, "overrides": args.overrides}

    trainer = Trainer(config, manifest, manifest, tmp / "exp", progress=False)
    device = trainer.device
    results["machine"] = describe_machine(device)
    results["parameters_millions"] = round(trainer.model.num_parameters() / 1e6, 2)
    print(f"{machine_line(results['machine'])}; {results['parameters_millions']} M parameters; "
          f"{len(trainer.train_utts)} utterances", flush=True)
    durations = [u.duration for u in trainer.train_utts]
    gen = torch.Generator().manual_seed(0)
    vocab = len(trainer.vocab)
    data = config.data

    def generated(sampler):
        for idx in sampler:
            yield generated_batch([durations[i] for i in idx], vocab, gen)

    base = Trainer(load_config(args.config, args.overrides + ["train.precision=fp32"]), manifest, manifest,
                   tmp / "base", progress=False)
    random_order = BucketBatchSampler(durations, data.max_batch_seconds, data.max_batch_size, num_buckets=1,
                                      sortagrad=False, seed=1)
    bucketed = BucketBatchSampler(durations, data.max_batch_seconds, data.max_batch_size, data.num_buckets,
                                  sortagrad=False, seed=1)
    table = {}

    def run(name: str, t: Trainer, batches) -> None:
        table[name] = r = measure(t, batches, args.steps, args.warmup)
        print(f"{name:34s} {r['audio_sec_per_sec']:9.1f} audio-s/s  step {r['step_seconds']:.3f} s  "
              f"padding {r['padding']:.0%}  peak memory {r['peak_memory_gib']:.2f} GiB", flush=True)

    run(BASELINE, base, endless(random_order, generated))
    del base  # its weights and optimiser state must not count in the next peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run(MODEL_BOUND, trainer, endless(bucketed, generated))
    if args.manifest:
        dataset = SpeechDataset(trainer.train_utts, trainer.vocab, data)
        run(INPUT_BOUND, trainer, endless(bucketed, lambda s: DataLoader(
            dataset, batch_sampler=s, collate_fn=collate, num_workers=data.num_workers,
            pin_memory=device.type == "cuda")))
    speed = {k: v["audio_sec_per_sec"] for k, v in table.items()}
    model_bound = speed[MODEL_BOUND]
    results["speed_up_vs_baseline"] = model_bound / speed[BASELINE]
    print(f"model-bound / baseline: {results['speed_up_vs_baseline']:.2f}x")
    if INPUT_BOUND in speed:
        results["input_bound_share"] = speed[INPUT_BOUND] / model_bound
        print(f"input-bound / model-bound: {results['input_bound_share']:.0%} "
              f"({data.num_workers} loader workers)")
    results["measurements"] = table
    if args.json:
        write_text_atomically(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
