"""Training loop: CTC loss, AdamW with warm-up and cosine decay, logs, dev evaluation, resumable checkpoints.

Runs as one process, or as several under torchrun (DistributedDataParallel): each rank takes its
share of every global step's batches, rank 0 evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .audio import SAMPLE_RATE, load_audio
from .checkpoint import (CheckpointError, architecture_differences, load_model_files, load_trainer_state,
                         read_model_json, reported_write_errors, save_model)
from .config import ExperimentConfig, config_to_dict
from .data import (BucketBatchSampler, ManifestError, SpeechDataset, Utterance, check_audio_files, collate,
                   drop_untrainable, filter_by_duration, read_manifest)
from .device import autocast, autocast_dtype, resolve_device
from .distributed import all_gather_objects, all_reduce_sum, barrier, init_distributed
from .evaluate import decode_utterances
from .files import discard_dir, remove_leftovers, replaced_atomically, write_text_atomically
from .metrics import error_rates
from .model import DeepSpeech2
from .text import Vocabulary

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d+)$")


@torch.no_grad()
def compute_global_stats(model: DeepSpeech2, utterances: list[Utterance], max_utterances: int = 2000,
                         seed: int = 0, progress: bool = True) -> None:
    """Set the model's global feature mean/std from (a random subset of) the training audio."""
    rng = random.Random(seed)
    sample = rng.sample(utterances, min(max_utterances, len(utterances)))
    device = model.features.mean.device
    total = torch.zeros(model.config.features.n_mels, dtype=torch.float64)
    total_sq, count = torch.zeros_like(total), 0
    for u in tqdm(sample, desc="feature statistics", leave=False, disable=not progress):
        wave = load_audio(u.audio_filepath).to(device)
        feats, _ = model.features.raw(wave[None], torch.tensor([len(wave)], device=device))
        feats = feats[0].double().cpu()
        total += feats.sum(1)
        total_sq += (feats ** 2).sum(1)
        count += feats.shape[1]
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(0).sqrt()
    model.features.set_global_stats(mean.float().to(device), std.float().to(device))


def _lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@dataclass
class TrainResult:
    best_wer: float
    best_dir: Path
    steps: int


class Trainer:
    """Trains a DeepSpeech2 model from manifests into `out_dir` (resuming from its last checkpoint)."""

    def __init__(self, config: ExperimentConfig, train_manifest: str | Path, dev_manifest: str | Path,
                 out_dir: str | Path, vocab: Vocabulary | None = None, progress: bool = True,
                 on_step: Callable[[int], None] | None = None):
        self.config = config
        self.out = Path(out_dir)
        self.vocab = vocab or Vocabulary()
        self.progress = progress
        self.on_step = on_step  # called after every optimiser step (tests use it to simulate a crash)
        self.dist, self.device = init_distributed(resolve_device(config.train.device))
        self.progress = progress and self.dist.is_main
        if config.train.grad_accumulation < 1:
            raise ValueError("train.grad_accumulation must be at least 1")
        self.amp_dtype = autocast_dtype(config.train.precision, self.device)
        data = config.data
        self.train_utts = filter_by_duration(read_manifest(train_manifest), data.max_duration)
        self.dev_utts = read_manifest(dev_manifest)
        if not self.train_utts:
            raise ManifestError(f"{train_manifest}: no utterance is shorter than max_duration={data.max_duration}")
        check_audio_files(self.train_utts, train_manifest)  # now, not at the first dev evaluation an epoch later
        check_audio_files(self.dev_utts, dev_manifest)
        self.skipped_utterances = 0  # audio that passed the check but failed to decode during training
        config.model.vocab_size = len(self.vocab)
        torch.manual_seed(config.train.seed)
        self.model = DeepSpeech2(config.model).to(self.device)
        listed = len(self.train_utts)
        self.train_utts, dropped = drop_untrainable(self.train_utts, self.vocab, self.model.output_lengths,
                                                    speed=max(data.speed_perturb, default=1.0))
        if dropped and self.dist.is_main:
            log.warning("%s: %d of %d training utterances skipped, CTC cannot learn from them: %s", train_manifest,
                        listed - len(self.train_utts), listed, dropped)
        if not self.train_utts:
            raise ManifestError(f"{train_manifest}: no utterance can be trained on ({dropped})")
        if config.train.compile:  # in place: parameter names, and so checkpoints, stay the same
            self.model.conv.compile(dynamic=True)
        if self.dist.rank:  # same initial weights everywhere, but each rank its own augmentation draws
            torch.manual_seed(config.train.seed + 7919 * self.dist.rank)
        self.ddp: DistributedDataParallel | None = None  # wraps self.model once the weights are final (fit)
        # an exponential moving average of the weights (and BatchNorm statistics): what is evaluated and kept
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.train.ema_decay),
                                  use_buffers=True) if config.train.ema_decay else None)
        self.sampler = BucketBatchSampler([u.duration for u in self.train_utts], data.max_batch_seconds,
                                          data.max_batch_size, data.num_buckets, shuffle=True,
                                          sortagrad=data.sortagrad, seed=config.train.seed,
                                          num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          group_size=config.train.grad_accumulation)
        total = sum(self._epoch_steps(e) for e in range(min(2, config.train.epochs)))
        total += max(0, config.train.epochs - 2) * self._epoch_steps(1)
        self.total_steps = min(total, config.train.max_steps) if config.train.max_steps else total
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.train.lr,
                                           weight_decay=config.train.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(config.train.warmup_steps, self.total_steps, config.train.min_lr_ratio))
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_wer = math.inf

    def init_weights(self, folder: Path) -> None:
        """Start from another model's weights (fine-tuning); its architecture and vocabulary must match."""
        source, vocab, _ = load_model_files(folder, "cpu")
        if vocab.tokens != self.vocab.tokens:
            raise CheckpointError(f"{folder}: its vocabulary differs from this run's")
        differ = sorted(architecture_differences(self.config.model, source.config))
        if differ:
            raise CheckpointError(f"{folder}: cannot initialise from it, model settings differ: {', '.join(differ)}")
        self.model.load_state_dict(source.state_dict())
        if self.ema is not None:
            self.ema.module.load_state_dict(source.state_dict())
        if self.dist.is_main:
            print(f"initialised from {folder}", flush=True)

    def _epoch_steps(self, epoch: int) -> int:
        return len(self.sampler.batches(epoch)) // self.config.train.grad_accumulation

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoint_root.is_dir():
            return None
        steps = [(int(m.group(1)), p) for p in self.checkpoint_root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return max(steps)[1] if steps else None

    def _rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "python": random.getstate()}

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        random.setstate(state["python"])

    def save_checkpoint(self) -> Path:
        """Every rank calls this (their RNG states are gathered); rank 0 writes."""
        path = self.checkpoint_root / f"step-{self.step:08d}"
        rng = all_gather_objects(self.dist, self._rng_state())
        if self.dist.is_main:
            state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "best_wer": self.best_wer, "world_size": self.dist.world_size,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rng, "ema": self.ema.state_dict() if self.ema is not None else None}
            save_model(path, self.model, self.vocab, self._metadata(), trainer_state=state)
            steps = sorted(p for p in self.checkpoint_root.iterdir() if _STEP_DIR.match(p.name))
            for old in steps[: -self.config.train.keep_checkpoints]:
                discard_dir(old)  # renamed first: a kill never leaves a half-deleted step-* folder
        barrier(self.dist)
        return path

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint folder: weights, optimiser, scheduler, position, RNG (and the average)."""
        model, vocab, _ = load_model_files(path, self.device)
        if vocab.tokens != self.vocab.tokens:
            raise CheckpointError(f"{path}: checkpoint vocabulary differs from this run's")
        state = load_trainer_state(path)
        if self.ema is not None and isinstance(state, dict) and state.get("ema") is None:
            raise CheckpointError(f"{path}: checkpoint has no weight average but train.ema_decay is set")
        try:
            self.model.load_state_dict(model.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch = state["step"], state["epoch"]
            self.batch_in_epoch, self.best_wer = state["batch_in_epoch"], state["best_wer"]
            if "rng" not in state:  # written before distributed training: one process's RNG state
                state["rng"] = [{"torch": state["torch_rng"], "cuda": None, "python": state["python_rng"]}]
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.dist.rank < len(state["rng"]):
                self._set_rng_state(state["rng"][self.dist.rank])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: its training state does not fit this run ({type(e).__name__}: {e})") from None
        if state.get("world_size", 1) != self.dist.world_size:
            log.warning("%s was written by %d process(es), this run has %d: the batch order of the epoch "
                        "in progress changes", path, state.get("world_size", 1), self.dist.world_size)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    def _check_resumable(self, checkpoint: Path) -> None:
        """Refuse, before anything is written, to resume from a checkpoint of another model or vocabulary."""
        config, vocab, _ = read_model_json(checkpoint)
        differ = [f"{k} {theirs!r} there, {mine!r} now"
                  for k, (mine, theirs) in sorted(architecture_differences(self.config.model, config).items())]
        if vocab.tokens != self.vocab.tokens:
            differ.append("the vocabulary")
        if differ:
            raise CheckpointError(f"{self.out}: cannot resume from {checkpoint.name}, model settings differ: "
                                  f"{'; '.join(differ)}. Train with the checkpoint's settings, or use --restart "
                                  "(discards that run) or another --out")

    def _metadata(self) -> dict:
        best = self.best_wer if math.isfinite(self.best_wer) else None  # JSON has no infinity
        return {"step": self.step, "epoch": self.epoch, "best_dev_wer": best,
                "experiment": config_to_dict(self.config)}

    # ---------------------------------------------------------------- logging
    def _log_row(self, name: str, row: dict) -> None:
        path = self.out / name
        new = not path.exists() or path.stat().st_size == 0
        with reported_write_errors(path, "log"), open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _trim_logs(self, step: int) -> None:
        """Drop the log rows past `step` (written after the checkpoint we resume from, by a run that was then
        killed) and half-written ones; each log is rewritten atomically."""
        for name in ("train_log.csv", "eval_log.csv"):
            path = self.out / name
            if not path.exists():
                continue
            with open(path, newline="", errors="replace") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                fields = reader.fieldnames
            if not fields or "step" not in fields:  # not even a whole header: nothing to keep
                path.unlink()
                continue
            keep = [r for r in rows if None not in r and None not in r.values()
                    and r["step"].isdigit() and int(r["step"]) <= step]
            if len(keep) == len(rows):
                continue
            with reported_write_errors(path, "log"), replaced_atomically(path) as (tmp,):
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(keep)
            log.info("%s: dropped %d row(s) past step %d", path, len(rows) - len(keep), step)

    # ---------------------------------------------------------------- loop
    @property
    def eval_model(self) -> DeepSpeech2:
        """The weights that are evaluated and saved as best: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self) -> dict:
        hyps, loss = decode_utterances(self.eval_model, self.vocab, self.dev_utts, self.config.data.max_batch_seconds,
                                       num_workers=self.config.data.num_workers, progress=self.progress,
                                       autocast_dtype=self.amp_dtype)
        rates = error_rates([u.text for u in self.dev_utts], [h.text for h in hyps])
        return {"step": self.step, "epoch": self.epoch, "dev_loss": round(loss, 4),
                "dev_wer": round(rates.wer, 5), "dev_cer": round(rates.cer, 5)}

    def _evaluate_and_checkpoint(self, writer) -> None:
        """Rank 0 scores dev and keeps the best model; then every rank joins the checkpoint."""
        if not self.dist.is_main:
            self.save_checkpoint()
            return
        result = self.evaluate()
        self._log_row("eval_log.csv", result)
        for k in ("dev_loss", "dev_wer", "dev_cer"):
            writer.add_scalar(f"dev/{k[4:]}", result[k], self.step)
        epochs = self.epoch + self.batch_in_epoch / self._epoch_steps(self.epoch)
        msg = f"step {self.step} (epoch {epochs:.2f}): dev WER {result['dev_wer']:.2%} CER {result['dev_cer']:.2%}"
        if result["dev_wer"] < self.best_wer:
            self.best_wer = result["dev_wer"]
            save_model(self.out / "best", self.eval_model, self.vocab, self._metadata())
            msg += " (best)"
        tqdm.write(msg)
        self.save_checkpoint()

    def fit(self, resume: bool = True) -> TrainResult:
        """Train to the end; with resume=False, earlier checkpoints and logs in out_dir are removed first."""
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.config
        main = self.dist.is_main
        previous = self.latest_checkpoint() if resume else None
        if previous is not None:  # before anything in out_dir changes
            self._check_resumable(previous)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            # what kills left: half-written folders and files, swapped-out old copies (put back if needed)
            leftovers = remove_leftovers(self.out, "best", "config.json", "train_log.csv", "eval_log.csv",
                                         "checkpoints", "tensorboard")
            leftovers += remove_leftovers(self.checkpoint_root, "step-*")
            if leftovers:
                log.info("removed %d leftover(s) of an interrupted run: %s", len(leftovers), leftovers)
            with reported_write_errors(self.out / "config.json", "configuration"):
                write_text_atomically(self.out / "config.json", json.dumps(config_to_dict(cfg), indent=2))
            if not resume:  # a fresh run: earlier checkpoints and logs would mix with this one's
                for name in ("checkpoints", "tensorboard"):
                    if (self.out / name).is_dir():
                        discard_dir(self.out / name)  # a kill midway must not leave half a checkpoint
                for name in ("train_log.csv", "eval_log.csv"):
                    (self.out / name).unlink(missing_ok=True)
            else:  # rows written after the checkpoint we resume from are written again
                latest = self.latest_checkpoint()
                self._trim_logs(int(_STEP_DIR.match(latest.name).group(1)) if latest is not None else 0)
        barrier(self.dist)  # out_dir is shared: every rank resumes from what rank 0 left there
        latest = self.latest_checkpoint()
        if latest is not None:
            self.resume(latest)
        elif cfg.train.init_from:
            self.init_weights(Path(cfg.train.init_from))
        elif cfg.model.features.normalization == "global":
            compute_global_stats(self.model, self.train_utts, seed=cfg.train.seed, progress=self.progress)
        if self.dist.enabled:
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                               else None)
        n_params = self.model.num_parameters()
        if main:
            print(f"model: {n_params / 1e6:.2f} M parameters, device {self.device} x {self.dist.world_size} "
                  f"process(es), {len(self.train_utts)} training utterances "
                  f"({sum(u.duration for u in self.train_utts) / 3600:.2f} h), about {self.total_steps} steps",
                  flush=True)
        writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None) if main else None
        dataset = SpeechDataset(self.train_utts, self.vocab, cfg.data)
        accumulate = cfg.train.grad_accumulation
        eval_every = cfg.train.eval_every_steps
        ckpt_every = cfg.train.checkpoint_every_steps
        max_steps = cfg.train.max_steps
        done = bool(max_steps) and self.step >= max_steps
        while self.epoch < cfg.train.epochs and not done:
            epoch_steps = self._epoch_steps(self.epoch)
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch * accumulate)
            loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate,
                                num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                                # its own generator: creating a loader mid-epoch (resuming) must not
                                # draw from the global RNG that the checkpoint restored
                                generator=torch.Generator().manual_seed(
                                    cfg.train.seed * 100_003 + self.epoch + 1_000_003 * self.dist.rank))
            self.model.train()
            bar = tqdm(total=epoch_steps, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                       disable=not self.progress, dynamic_ncols=True)
            tick = time.perf_counter()
            batches = iter(loader)
            while self.batch_in_epoch < epoch_steps:
                metrics = self.train_step([next(batches) for _ in range(accumulate)])
                self.step += 1
                self.batch_in_epoch += 1
                now = time.perf_counter()
                metrics["audio_sec_per_sec"] = round(metrics.pop("audio_seconds") / (now - tick), 1)
                tick = now
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                speed=f"{metrics['audio_sec_per_sec']:.0f}x")
                if main and (self.step % cfg.train.log_every_steps == 0 or self.step == 1):
                    self._log_row("train_log.csv", {"step": self.step, "epoch": self.epoch, **metrics})
                    for k, v in metrics.items():
                        writer.add_scalar(f"train/{k}", v, self.step)
                done = bool(max_steps) and self.step >= max_steps
                last = done or (self.epoch == cfg.train.epochs - 1 and self.batch_in_epoch == epoch_steps)
                if (eval_every and self.step % eval_every == 0) or last:
                    self._evaluate_and_checkpoint(writer)
                elif ckpt_every and self.step % ckpt_every == 0:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self.step)
                if done:
                    break
            bar.close()
            del batches  # shuts the loader's workers down
            if done:
                break
            self.epoch += 1
            self.batch_in_epoch = 0
            if not eval_every and self.epoch < cfg.train.epochs:
                self._evaluate_and_checkpoint(writer)
        if writer is not None:
            writer.close()
        barrier(self.dist)
        return TrainResult(self.best_wer, self.out / "best", self.step)

    def _zero_backward(self, sync: bool) -> None:
        """A DDP forward and backward that adds nothing to the gradients, for a micro-batch with no utterance
        left: DDP's collectives (buffer broadcast, gradient all-reduce) must match across ranks."""
        wave = torch.zeros(1, SAMPLE_RATE, device=self.device)
        self.model.eval()  # a stand-in must not move BatchNorm statistics
        try:
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with autocast(self.device, self.amp_dtype):
                    log_probs, _ = self.ddp(wave, torch.tensor([SAMPLE_RATE], device=self.device))
                (log_probs.sum() * 0.0).backward()
        finally:
            self.model.train()

    def train_step(self, batches: list[dict]) -> dict:
        """One optimiser step over this rank's `batches` (gradient accumulation) and the other ranks' batches.

        The loss is the CTC loss summed over every utterance of the global step, divided by their
        number, whatever the split across ranks and micro-batches: one process accumulating N
        batches takes the same step as N processes with one batch each.
        """
        for bad in (bad for b in batches for bad in b["unreadable"]):  # failed to decode in a loader worker
            self.skipped_utterances += 1
            log.warning("%s: %s; skipped (%d unreadable utterance(s) so far)", bad.source, bad.problem,
                        self.skipped_utterances)
        counts = torch.tensor([sum(len(b["ids"]) for b in batches),
                               sum(int(b["wave_lengths"].sum()) for b in batches)], dtype=torch.float64)
        utterances, samples = all_reduce_sum(self.dist, counts).tolist()
        self.optimizer.zero_grad(set_to_none=True)
        if utterances == 0:  # every utterance of this step, on every rank, failed to load: nothing to learn
            log.warning("step %d: no readable utterance, update skipped", self.step)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            return {"loss": 0.0, "grad_norm": 0.0, "lr": lr, "audio_seconds": 0.0}
        scale = self.dist.world_size / utterances  # DDP averages gradients over ranks
        model = self.ddp or self.model
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            if not batch["ids"]:  # all failed to load; under DDP, still take part in every collective
                if self.ddp is not None:
                    self._zero_backward(sync=i == len(batches) - 1)
                continue
            sync = self.ddp is None or i == len(batches) - 1  # all-reduce gradients once, after the last
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                waves = batch["waves"].to(self.device, non_blocking=True)
                lengths = batch["wave_lengths"].to(self.device, non_blocking=True)
                with autocast(self.device, self.amp_dtype):
                    log_probs, out_lengths = model(waves, lengths)
                loss = torch.nn.functional.ctc_loss(
                    log_probs.transpose(0, 1), batch["targets"].to(self.device, non_blocking=True), out_lengths,
                    batch["target_lengths"].to(self.device, non_blocking=True), blank=self.vocab.blank,
                    reduction="sum", zero_infinity=True)
                (loss * scale).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        if torch.isfinite(grad_norm):  # gradients are already the same on every rank: so is this choice
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        else:  # one bad batch must not destroy the weights
            log.warning("step %d: non-finite gradient, update skipped (batches from %s)", self.step,
                        batches[0]["ids"][:4])
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        loss_value = all_reduce_sum(self.dist, loss_sum).item() / utterances
        return {"loss": round(loss_value, 4), "grad_norm": round(float(grad_norm), 3), "lr": lr,
                "audio_seconds": samples / SAMPLE_RATE}
