"""Training loop: CTC loss, AdamW with warm-up and cosine decay, logs, dev evaluation, resumable checkpoints."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .audio import SAMPLE_RATE, load_audio
from .checkpoint import load_model_files, load_trainer_state, recover_dir, save_model
from .config import ExperimentConfig, config_to_dict
from .data import BucketBatchSampler, SpeechDataset, Utterance, collate, filter_by_duration, read_manifest
from .device import autocast, autocast_dtype, resolve_device
from .evaluate import decode_utterances
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
        self.device = resolve_device(config.train.device)
        self.amp_dtype = autocast_dtype(config.train.precision, self.device)
        data = config.data
        self.train_utts = filter_by_duration(read_manifest(train_manifest), data.max_duration)
        self.dev_utts = read_manifest(dev_manifest)
        if not self.train_utts:
            raise ValueError(f"{train_manifest}: no utterance is shorter than max_duration={data.max_duration}")
        config.model.vocab_size = len(self.vocab)
        torch.manual_seed(config.train.seed)
        self.model = DeepSpeech2(config.model).to(self.device)
        self.sampler = BucketBatchSampler([u.duration for u in self.train_utts], data.max_batch_seconds,
                                          data.max_batch_size, data.num_buckets, shuffle=True,
                                          sortagrad=data.sortagrad, seed=config.train.seed)
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

    def _epoch_steps(self, epoch: int) -> int:
        return len(self.sampler.batches(epoch))

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

    def _trainer_state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_wer": self.best_wer,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "python_rng": random.getstate(),
        }

    def save_checkpoint(self) -> Path:
        path = self.checkpoint_root / f"step-{self.step:08d}"
        save_model(path, self.model, self.vocab, self._metadata(), trainer_state=self._trainer_state())
        steps = sorted(p for p in self.checkpoint_root.iterdir() if _STEP_DIR.match(p.name))
        for old in steps[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def resume(self, path: Path) -> None:
        model, vocab, _ = load_model_files(path, self.device)
        if vocab.tokens != self.vocab.tokens:
            raise ValueError(f"{path}: checkpoint vocabulary differs from this run's")
        self.model.load_state_dict(model.state_dict())
        state = load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.best_wer = state["batch_in_epoch"], state["best_wer"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        log.info("resumed from %s (step %d, epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    def _metadata(self) -> dict:
        best = self.best_wer if math.isfinite(self.best_wer) else None  # JSON has no infinity
        return {"step": self.step, "epoch": self.epoch, "best_dev_wer": best,
                "experiment": config_to_dict(self.config)}

    # ---------------------------------------------------------------- logging
    def _log_row(self, name: str, row: dict) -> None:
        path = self.out / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    # ---------------------------------------------------------------- loop
    def evaluate(self) -> dict:
        hyps, loss = decode_utterances(self.model, self.vocab, self.dev_utts, self.config.data.max_batch_seconds,
                                       num_workers=self.config.data.num_workers, progress=self.progress,
                                       autocast_dtype=self.amp_dtype)
        rates = error_rates([u.text for u in self.dev_utts], [h.text for h in hyps])
        return {"step": self.step, "epoch": self.epoch, "dev_loss": round(loss, 4),
                "dev_wer": round(rates.wer, 5), "dev_cer": round(rates.cer, 5)}

    def _evaluate_and_checkpoint(self, writer) -> None:
        result = self.evaluate()
        self._log_row("eval_log.csv", result)
        for k in ("dev_loss", "dev_wer", "dev_cer"):
            writer.add_scalar(f"dev/{k[4:]}", result[k], self.step)
        epochs = self.epoch + self.batch_in_epoch / self._epoch_steps(self.epoch)
        msg = f"step {self.step} (epoch {epochs:.2f}): dev WER {result['dev_wer']:.2%} CER {result['dev_cer']:.2%}"
        if result["dev_wer"] < self.best_wer:
            self.best_wer = result["dev_wer"]
            save_model(self.out / "best", self.model, self.vocab, self._metadata())
            msg += " (best)"
        tqdm.write(msg)
        self.save_checkpoint()

    def fit(self, resume: bool = True) -> TrainResult:
        """Train to the end; with resume=False, earlier checkpoints and logs in out_dir are removed first."""
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        recover_dir(self.out / "best")
        (self.out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        if not resume:  # a fresh run: earlier checkpoints and logs would mix with this one's
            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            for name in ("train_log.csv", "eval_log.csv"):
                (self.out / name).unlink(missing_ok=True)
        latest = self.latest_checkpoint()
        if latest is not None:
            self.resume(latest)
        elif cfg.model.features.normalization == "global":
            compute_global_stats(self.model, self.train_utts, seed=cfg.train.seed, progress=self.progress)
        n_params = self.model.num_parameters()
        print(f"model: {n_params / 1e6:.2f} M parameters, device {self.device}, "
              f"{len(self.train_utts)} training utterances ({sum(u.duration for u in self.train_utts) / 3600:.2f} h), "
              f"about {self.total_steps} steps", flush=True)
        writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None)
        dataset = SpeechDataset(self.train_utts, self.vocab, cfg.data.speed_perturb, cfg.data.noise_snr_db,
                                cfg.data.noise_prob, cfg.data.noise_exponent)
        eval_every = cfg.train.eval_every_steps
        ckpt_every = cfg.train.checkpoint_every_steps
        max_steps = cfg.train.max_steps
        done = bool(max_steps) and self.step >= max_steps
        while self.epoch < cfg.train.epochs and not done:
            epoch_steps = self._epoch_steps(self.epoch)
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate,
                                num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                                # its own generator: creating a loader mid-epoch (resuming) must not
                                # draw from the global RNG that the checkpoint restored
                                generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + self.epoch))
            self.model.train()
            bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", disable=not self.progress,
                       total=epoch_steps, initial=self.batch_in_epoch, dynamic_ncols=True)
            tick = time.perf_counter()
            for batch in bar:
                metrics = self._train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                now = time.perf_counter()
                metrics["audio_sec_per_sec"] = round(float(batch["wave_lengths"].sum()) / SAMPLE_RATE / (now - tick), 1)
                tick = now
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                speed=f"{metrics['audio_sec_per_sec']:.0f}x")
                if self.step % cfg.train.log_every_steps == 0 or self.step == 1:
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
            if done:
                break
            self.epoch += 1
            self.batch_in_epoch = 0
            if not eval_every and self.epoch < cfg.train.epochs:
                self._evaluate_and_checkpoint(writer)
        writer.close()
        return TrainResult(self.best_wer, self.out / "best", self.step)

    def _train_step(self, batch: dict) -> dict:
        waves = batch["waves"].to(self.device, non_blocking=True)
        lengths = batch["wave_lengths"].to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            log_probs, out_lengths = self.model(waves, lengths)
        loss = torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1), batch["targets"].to(self.device), out_lengths,
            batch["target_lengths"].to(self.device), blank=self.vocab.blank, reduction="sum",
            zero_infinity=True) / waves.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:  # one bad batch must not destroy the weights
            log.warning("step %d: non-finite gradient, update skipped (batch %s)", self.step, batch["ids"][:4])
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"loss": round(loss.item(), 4), "grad_norm": round(float(grad_norm), 3), "lr": lr}
