"""Training loop: CTC loss (optionally consistency-regularised, consistency.py), AdamW with warm-up and
cosine decay, logs, dev evaluation, resumable checkpoints.

Runs as one process, or as several under torchrun (DistributedDataParallel): each rank takes its
share of every global step's batches, rank 0 evaluates, logs and writes checkpoints. Checkpoint folders
and their rotation live in checkpoints.py, the CSV/TensorBoard logs and progress bars in logs.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..audio import SAMPLE_RATE, load_audio
from ..checkpoint import (
    CheckpointError,
    architecture_differences,
    load_model_files,
    load_trainer_state,
    read_model_json,
    reported_write_errors,
    save_model,
    word_pieces_of,
)
from ..config import ConfigError, ExperimentConfig, TrainConfig, config_to_dict
from ..device import autocast, autocast_dtype, resolve_device
from ..features import GLOBAL_STATISTICS
from ..files import write_text_atomically
from ..manifest import ManifestError, Utterance, check_audio_files, drop_untrainable, filter_by_duration, read_manifest
from ..metrics import error_rates
from ..model import DeepSpeech2, ModelConfig
from ..serve.evaluate import evaluate_utterances
from ..serve.transcribe import ASRModel
from ..text import Vocabulary
from ..word_pieces import WordPieceError, WordPieceVocabulary
from .checkpoints import (
    CHECKPOINTS,
    check_resumable,
    checkpoint_dir,
    checkpoint_step,
    discard_checkpoints,
    latest_checkpoint,
    network_differences,
    prune_checkpoints,
    remove_kill_leftovers,
    rng_state,
    saved_rng_states,
    set_rng_state,
)
from .consistency import consistency_loss
from .data import BucketBatchSampler, SpeechDataset, collate
from .distributed import all_gather_objects, all_reduce_sum, barrier, init_distributed
from .logs import LOG_NAMES, IntervalMeans, RunLogs, discard_logs, epoch_progress, print_line, show_step, trim_logs

log = logging.getLogger(__name__)
# what a one-way model may set differently from the bidirectional model it starts from (train.init_from)
ONE_WAY_START_KEYS = {"bidirectional", "lookahead_frames", "end_silence_ms", "features.normalization",
                      "features.level_window_ms", "features.level_prior_ms"}
WIDEN_NOISE = 1e-3  # a model that starts wider than its source (train.init_from): noise on the copied weights


def _word_pieces_from(source: str, key: str) -> Vocabulary:
    """The word pieces of a sentencepiece model file, or of a model folder: its second output layer's, else its
    first's vocabulary (characters, for a character model); `key` names the setting in errors."""
    if Path(source).is_dir():
        _, vocab, meta = read_model_json(source)
        return word_pieces_of(meta) or vocab
    try:
        return WordPieceVocabulary.from_file(source)
    except WordPieceError as e:
        raise ConfigError(f"{key}: {e}") from None


def run_vocabulary(tokenizer: str) -> Vocabulary:
    """What a run's model emits: characters, or the word pieces of train.tokenizer (a sentencepiece model file,
    or a model folder whose word pieces to take)."""
    return _word_pieces_from(tokenizer, "train.tokenizer") if tokenizer else Vocabulary()


def run_word_pieces(train: TrainConfig) -> WordPieceVocabulary | None:
    """The vocabulary of a run's second output layer: train.word_pieces, a sentencepiece model file or a model
    folder whose word pieces to take (its second output layer's, or its first's); without it, those of the
    train.init_from model's second output layer (fine-tuning keeps both layers), else None."""
    if not train.word_pieces:
        if train.init_from and not train.tokenizer and Path(train.init_from).is_dir():
            return word_pieces_of(read_model_json(train.init_from)[2])
        return None
    pieces = _word_pieces_from(train.word_pieces, "train.word_pieces")
    if not isinstance(pieces, WordPieceVocabulary):
        raise ConfigError(f"train.word_pieces: {train.word_pieces} is a model without word pieces")
    return pieces


def time_strides_alone_differ(mine: ModelConfig, theirs: ModelConfig) -> bool:
    """Whether two conv fronts stride alike in frequency, layer for layer: then only their time strides can differ,
    and every weight keeps its shape (the frames the GRUs see are longer or shorter)."""
    return (len(mine.conv_strides) == len(theirs.conv_strides)
            and all(m[1] == t[1] for m, t in zip(mine.conv_strides, theirs.conv_strides)))


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


def _lr_lambda(warmup: int, total: int, min_ratio: float,
               time_used: Callable[[], float] = lambda: 0.0) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` over the rest of `total` steps, or
    faster when `time_used()` (the fraction of a time budget spent) is further along than the steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_used()))
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
                 out_dir: str | Path, vocab: Vocabulary | None = None, progress: bool = True):
        self.out = Path(out_dir)
        self.vocab = vocab or run_vocabulary(config.train.tokenizer)
        self.config = copy.deepcopy(config)  # sized to the vocabulary here; the caller's stays as it was
        self.config.model.vocab_size = len(self.vocab)
        self.word_pieces = run_word_pieces(config.train)  # a second output layer's vocabulary, or None
        self.config.model.word_piece_vocab_size = len(self.word_pieces) if self.word_pieces else 0
        data, train = self.config.data, self.config.train
        self.dist, self.device = init_distributed(resolve_device(train.device))
        self.progress = progress and self.dist.is_main
        self.amp_dtype = autocast_dtype(train.precision, self.device)

        # the utterances, their audio checked now rather than at the first dev evaluation an epoch later
        self.train_utts = filter_by_duration(read_manifest(train_manifest), data.max_duration)
        self.dev_utts = read_manifest(dev_manifest)
        if not self.train_utts:
            raise ManifestError(f"{train_manifest}: no utterance is shorter than max_duration={data.max_duration}")
        check_audio_files(self.train_utts, train_manifest)
        check_audio_files(self.dev_utts, dev_manifest)
        self.skipped_utterances = 0  # audio that passed the check but failed to decode during training

        gru_layers = self.config.model.gru_layers
        self.intermediate_layer = ((train.intermediate_ctc_layer or (gru_layers + 1) // 2)
                                   if train.intermediate_ctc_weight else 0)  # intermediate CTC's GRU layer, or 0
        if self.intermediate_layer > gru_layers:
            raise ConfigError(f"train.intermediate_ctc_layer: the model has {gru_layers} GRU layers, "
                              f"got {self.intermediate_layer}")
        torch.manual_seed(train.seed)
        self.model = DeepSpeech2(self.config.model).to(self.device)
        self.train_utts = self._trainable(self.train_utts, train_manifest)
        if train.compile:  # in place: parameter names, and so checkpoints, stay the same
            self.model.conv.compile(dynamic=True)
        if self.dist.rank:  # same initial weights everywhere, but each rank its own augmentation draws
            torch.manual_seed(train.seed + 7919 * self.dist.rank)
        self.ddp: DistributedDataParallel | None = None  # wraps self.model once the weights are final (fit)
        # an exponential moving average of the weights (and BatchNorm statistics): what is evaluated and kept
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay),
                                  use_buffers=True) if train.ema_decay else None)

        self.sampler = BucketBatchSampler([u.duration for u in self.train_utts], data.max_batch_seconds,
                                          data.max_batch_size, data.num_buckets, shuffle=True,
                                          sortagrad=data.sortagrad, seed=train.seed,
                                          num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          group_size=train.grad_accumulation)
        self.total_steps = self._count_steps()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                           fused=self.device.type == "cuda")
        self.time_used = 0.0  # the fraction of train.max_minutes spent, agreed by all ranks after each step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(train.warmup_steps, self.total_steps, train.min_lr_ratio,
                                       (lambda: self.time_used) if train.time_schedule else (lambda: 0.0)))

        # the position in training (resume restores it)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_wer = math.inf
        self.audio_seconds = 0.0  # audio trained on so far, after speed perturbation, all ranks (the logs' audio_hours)
        self.interval = IntervalMeans()  # the steps since the last train_log.csv row
        self.logs: RunLogs | None = None  # rank 0's, while fit runs
        self.started = math.inf  # time.monotonic() at which fit began

    def _trainable(self, utterances: list[Utterance], manifest: str | Path) -> list[Utterance]:
        """The utterances CTC can learn from with this model; the others are counted in a warning."""
        kept, dropped = drop_untrainable(utterances, self.vocab, self.model.output_lengths,
                                         speed=max(self.config.data.speed_perturb, default=1.0))
        if dropped and self.dist.is_main:
            log.warning("%s: %d of %d training utterances skipped, CTC cannot learn from them: %s", manifest,
                        len(utterances) - len(kept), len(utterances), dropped)
        if not kept:
            raise ManifestError(f"{manifest}: no utterance can be trained on ({dropped})")
        return kept

    def _epoch_steps(self, epoch: int) -> int:
        return len(self.sampler.batches(epoch)) // self.config.train.grad_accumulation

    def _count_steps(self) -> int:
        """Optimiser steps of the whole run (for the learning-rate schedule): epoch 0 may be sorted by length
        (SortaGrad), the later ones are shuffled alike."""
        train = self.config.train
        total = sum(self._epoch_steps(e) for e in range(min(2, train.epochs)))
        total += max(0, train.epochs - 2) * self._epoch_steps(1)
        return min(total, train.max_steps) if train.max_steps else total

    def init_weights(self, folder: Path) -> None:
        """Start from another model's weights (fine-tuning); its architecture and vocabulary must match, except
        that a one-way (streaming) model may start from a bidirectional one's forward direction, and a model
        whose gru_hidden is a multiple of the source's starts from its units copied (DeepSpeech2.load_widened), and
        one whose convolutions stride differently in time (not in frequency) starts from the same weights, and a
        run with word pieces (train.tokenizer) starts from all but the output layer of a model with others, and
        one with a second output layer (train.word_pieces) from all but that of a model without it or with other
        pieces."""
        source, vocab, meta = load_model_files(folder, "cpu")
        new_tokens = vocab.tokens != self.vocab.tokens
        if new_tokens and not self.config.train.tokenizer:
            raise CheckpointError(f"{folder}: its vocabulary differs from this run's")
        if new_tokens:
            source.replace_output_layer(self.model.head[1])  # this run's fresh one
        their_pieces = word_pieces_of(meta)
        new_pieces = self.word_pieces is not None and (their_pieces or vocab).tokens != self.word_pieces.tokens
        if new_pieces:  # this run's fresh second output layer
            source.piece_head = copy.deepcopy(self.model.piece_head)
            source.config = dataclasses.replace(source.config, word_piece_vocab_size=len(self.word_pieces))
        mine, theirs = self.config.model, source.config
        one_way_start = theirs.bidirectional and not mine.bidirectional
        widen = mine.gru_hidden > theirs.gru_hidden and mine.gru_hidden % theirs.gru_hidden == 0 and not one_way_start
        restride = mine.conv_strides != theirs.conv_strides and time_strides_alone_differ(mine, theirs)
        differ = sorted(set(architecture_differences(mine, theirs)) - (ONE_WAY_START_KEYS if one_way_start else set())
                        - ({"gru_hidden"} if widen else set()) - ({"conv_strides"} if restride else set()))
        if differ:
            raise CheckpointError(f"{folder}: cannot initialise from it, model settings differ: {', '.join(differ)}")
        if one_way_start:
            self.model.load_forward_direction(source)
            if mine.features.normalization in GLOBAL_STATISTICS:
                compute_global_stats(self.model, self.train_utts, seed=self.config.train.seed, progress=self.progress)
        elif widen:
            self.model.load_widened(source, noise=WIDEN_NOISE, seed=self.config.train.seed)
        else:
            self.model.load_state_dict(source.state_dict())
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
        if self.dist.is_main:
            grown = f", its GRUs widened from {theirs.gru_hidden} to {mine.gru_hidden}" if widen else ""
            if restride:
                grown += f", its time stride changed from {theirs.time_stride} to {mine.time_stride}"
            if new_tokens:
                grown += f", a new output layer for {len(self.vocab)} tokens (its own had {len(vocab)})"
            if new_pieces:
                grown += f", a new second output layer for {len(self.word_pieces)} word pieces"
            print(f"initialised from {folder}{grown}", flush=True)

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.out / CHECKPOINTS

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_root)

    def save_checkpoint(self) -> Path:
        """Every rank calls this (their RNG states are gathered); rank 0 writes, then prunes old checkpoints."""
        path = checkpoint_dir(self.checkpoint_root, self.step)
        rng = all_gather_objects(self.dist, rng_state(self.device))
        if self.dist.is_main:
            state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "best_wer": self.best_wer, "world_size": self.dist.world_size, "audio_seconds": self.audio_seconds,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rng, "ema": self.ema.state_dict() if self.ema is not None else None}
            save_model(path, self.model, self.vocab, self._metadata(), trainer_state=state,
                       word_pieces=self.word_pieces)
            prune_checkpoints(self.checkpoint_root, self.config.train.keep_checkpoints)
        barrier(self.dist)
        return path

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint folder: weights, optimiser, scheduler, position, RNG (and the average)."""
        differ = network_differences(path, self.config.model, self.vocab, self.word_pieces)
        if differ:
            raise CheckpointError(f"{path}: the checkpoint's network differs from this run's ({'; '.join(differ)})")
        model, _, _ = load_model_files(path, self.device)
        state = load_trainer_state(path)
        if self.ema is not None and isinstance(state, dict) and state.get("ema") is None:
            raise CheckpointError(f"{path}: checkpoint has no weight average but train.ema_decay is set")
        try:
            self.model.load_state_dict(model.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch = state["step"], state["epoch"]
            self.batch_in_epoch, self.best_wer = state["batch_in_epoch"], state["best_wer"]
            self.audio_seconds = float(state.get("audio_seconds", math.nan))  # nan: written before it was counted
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            rng = saved_rng_states(state)
            if self.dist.rank < len(rng):
                set_rng_state(rng[self.dist.rank], self.device)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: its training state does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
        if state.get("world_size", 1) != self.dist.world_size:
            log.warning("%s was written by %d process(es), this run has %d: the batch order of the epoch "
                        "in progress changes", path, state.get("world_size", 1), self.dist.world_size)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    def _metadata(self) -> dict:
        best = self.best_wer if math.isfinite(self.best_wer) else None  # JSON has no infinity
        return {"step": self.step, "epoch": self._epochs_finished(), "best_dev_wer": best,
                "experiment": config_to_dict(self.config)}

    # ---------------------------------------------------------------- evaluation
    @property
    def eval_model(self) -> DeepSpeech2:
        """The weights that are evaluated and saved as best: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self) -> dict:
        """Dev WER/CER and CTC loss of the evaluated weights, through the path `transcribe` takes."""
        training = self.eval_model.training
        mean_seconds = sum(u.duration for u in self.dev_utts) / max(1, len(self.dev_utts))
        batch_size = max(1, int(self.config.data.max_batch_seconds / max(mean_seconds, 1.0)))
        try:
            model = ASRModel(self.eval_model, self.vocab, autocast_dtype=self.amp_dtype,  # sets eval mode
                             word_pieces=self.word_pieces)
            hyps, loss = evaluate_utterances(model, self.dev_utts, self.progress, batch_size=batch_size)
        finally:
            self.eval_model.train(training)
        rates = error_rates([u.text for u in self.dev_utts], [h.text for h in hyps])
        return {"step": self.step, "epoch": self._epochs_finished(), "dev_loss": round(loss, 4),
                "dev_wer": round(rates.wer, 5), "dev_cer": round(rates.cer, 5)}

    def _evaluate_and_checkpoint(self) -> None:
        """Rank 0 scores dev, logs it and keeps the best model; then every rank joins the checkpoint."""
        if not self.dist.is_main:
            self.save_checkpoint()
            return
        result = {**self.evaluate(), "audio_hours": self._audio_hours()}
        self.logs.eval(result)
        epochs = self.epoch + self.batch_in_epoch / self._epoch_steps(self.epoch)
        msg = f"step {self.step} (epoch {epochs:.2f}): dev WER {result['dev_wer']:.2%} CER {result['dev_cer']:.2%}"
        if result["dev_wer"] < self.best_wer:
            self.best_wer = result["dev_wer"]
            save_model(self.out / "best", self.eval_model, self.vocab, self._metadata(), word_pieces=self.word_pieces)
            msg += " (best)"
        print_line(msg)
        self.save_checkpoint()

    # ---------------------------------------------------------------- loop
    def fit(self, resume: bool = True) -> TrainResult:
        """Train to the end; with resume=False, earlier checkpoints and logs in out_dir are removed first."""
        train = self.config.train
        self.started, self.time_used = time.monotonic(), 0.0
        previous = self.latest_checkpoint() if resume else None
        if previous is not None:  # before anything in out_dir changes
            check_resumable(previous, self.out, self.config.model, self.vocab, self.word_pieces)
        if self.dist.is_main:
            self._prepare_out_dir(resume)
        barrier(self.dist)  # out_dir is shared: every rank resumes from what rank 0 left there
        self._start_weights()
        if self.dist.enabled:
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                               else None)
        if self.dist.is_main:
            print(f"model: {self.model.num_parameters() / 1e6:.2f} M parameters, device {self.device} x "
                  f"{self.dist.world_size} process(es), {len(self.train_utts)} training utterances "
                  f"({sum(u.duration for u in self.train_utts) / 3600:.2f} h), about {self.total_steps} steps",
                  flush=True)
            self.logs = RunLogs(self.out, self.step)
        dataset = SpeechDataset(self.train_utts, self.vocab, self.config.data, self.word_pieces)
        done = self._reached_max_steps()
        while self.epoch < train.epochs and not done:
            done = self._train_epoch(dataset)
            if done:
                break
            self.epoch += 1
            self.batch_in_epoch = 0
            if not train.eval_every_steps and self.epoch < train.epochs:
                self._evaluate_and_checkpoint()
        if self.logs is not None:
            self.logs.close()
            self.logs = None
        barrier(self.dist)
        return TrainResult(self.best_wer, self.out / "best", self.step)

    def _prepare_out_dir(self, resume: bool) -> None:
        """Rank 0, before training: clear what kills left, write config.json, and discard the earlier run's
        checkpoints and logs (a fresh run) or cut its logs back to the checkpoint resumed from."""
        self.out.mkdir(parents=True, exist_ok=True)
        leftovers = remove_kill_leftovers(self.out, "best", "config.json", *LOG_NAMES)
        if leftovers:
            log.info("removed %d leftover(s) of an interrupted run: %s", len(leftovers), leftovers)
        with reported_write_errors(self.out / "config.json", "configuration"):
            write_text_atomically(self.out / "config.json", json.dumps(config_to_dict(self.config), indent=2))
        if not resume:  # earlier checkpoints and logs would mix with this run's
            discard_checkpoints(self.out)
            discard_logs(self.out)
        else:  # rows written after the checkpoint we resume from are written again
            latest = self.latest_checkpoint()
            trim_logs(self.out, checkpoint_step(latest) if latest is not None else 0)

    def _start_weights(self) -> None:
        """The weights (and position) training starts from: the latest checkpoint, train.init_from, or fresh
        ones (with global feature statistics when the model normalises with them)."""
        latest = self.latest_checkpoint()
        if latest is not None:
            self.resume(latest)
        elif self.config.train.init_from:
            self.init_weights(Path(self.config.train.init_from))
        elif self.config.model.features.normalization in GLOBAL_STATISTICS:
            compute_global_stats(self.model, self.train_utts, seed=self.config.train.seed, progress=self.progress)

    def _reached_max_steps(self) -> bool:
        return bool(self.config.train.max_steps) and self.step >= self.config.train.max_steps

    def _out_of_time(self) -> bool:
        """train.max_minutes have passed since fit began, on any rank; updates self.time_used, the largest
        fraction spent on any rank (every rank stops at the same step, with the same learning rate)."""
        if not self.config.train.max_minutes:
            return False
        used = torch.zeros(self.dist.world_size, dtype=torch.float64)
        used[self.dist.rank] = (time.monotonic() - self.started) / (60 * self.config.train.max_minutes)
        self.time_used = all_reduce_sum(self.dist, used).max().item()
        return self.time_used >= 1

    def _epochs_finished(self) -> int:
        """Whole epochs done: self.epoch, the epoch in progress, until the loop moves on past its last batch."""
        return self.epoch + (self.batch_in_epoch >= self._epoch_steps(self.epoch))

    def _audio_hours(self) -> float:
        return round(self.audio_seconds / 3600, 5)

    def _train_epoch(self, dataset: SpeechDataset) -> bool:
        """Train the rest of the current epoch, logging, evaluating and checkpointing as configured.
        Returns True when train.max_steps is reached or train.max_minutes have passed."""
        train = self.config.train
        epoch_steps = self._epoch_steps(self.epoch)
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch * train.grad_accumulation)
        loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate,
                            num_workers=self.config.data.num_workers, pin_memory=self.device.type == "cuda",
                            # its own generator: creating a loader mid-epoch (resuming) must not
                            # draw from the global RNG that the checkpoint restored
                            generator=torch.Generator().manual_seed(
                                train.seed * 100_003 + self.epoch + 1_000_003 * self.dist.rank))
        self.model.train()
        bar = epoch_progress(self.epoch, train.epochs, epoch_steps, self.batch_in_epoch, self.progress)
        tick = time.perf_counter()
        batches = iter(loader)
        done = False
        while self.batch_in_epoch < epoch_steps and not done:
            metrics = self.train_step([next(batches) for _ in range(train.grad_accumulation)])
            self.step += 1
            self.batch_in_epoch += 1
            now = time.perf_counter()
            seconds = metrics.pop("audio_seconds")
            self.audio_seconds += seconds
            self.interval.add(metrics, metrics.pop("utterances"), seconds, now - tick)
            tick = now
            metrics.update(self.interval.means(), audio_hours=self._audio_hours())
            show_step(bar, metrics)
            if self.step % train.log_every_steps == 0 or self.step == 1:
                if self.logs is not None:
                    self.logs.train(self.step, self.epoch, metrics)
                self.interval.reset()
            done = self._reached_max_steps() or self._out_of_time()
            last = done or (self.epoch == train.epochs - 1 and self.batch_in_epoch == epoch_steps)
            if (train.eval_every_steps and self.step % train.eval_every_steps == 0) or last:
                self._evaluate_and_checkpoint()
                tick = time.perf_counter()  # the speed logged is training's: the evaluation is not in it
            elif train.checkpoint_every_steps and self.step % train.checkpoint_every_steps == 0:
                self.save_checkpoint()
        bar.close()
        del batches  # shuts the loader's workers down
        return done

    # ---------------------------------------------------------------- one optimiser step
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
        train = self.config.train
        views = 2 if train.consistency_weight else 1  # CR-CTC (consistency.py): each utterance seen twice
        self.optimizer.zero_grad(set_to_none=True)
        if utterances == 0:  # every utterance of this step, on every rank, failed to load: nothing to learn
            log.warning("step %d: no readable utterance, update skipped", self.step)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            return {"loss": 0.0, "grad_norm": 0.0, "lr": lr, "audio_seconds": 0.0, "utterances": 0,
                    **({"consistency": 0.0} if views == 2 else {}),
                    **({"intermediate": 0.0} if self.intermediate_layer else {}),
                    **({"word_pieces": 0.0} if self.word_pieces else {})}
        scale = self.dist.world_size / utterances  # DDP averages gradients over ranks
        model = self.ddp or self.model
        # CTC loss, consistency, intermediate CTC, the word pieces' CTC
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        chars = len(self.vocab)  # the output's first columns (any after them: the word pieces)
        for i, batch in enumerate(batches):
            if not batch["ids"]:  # all failed to load; under DDP, still take part in every collective
                if self.ddp is not None:
                    self._zero_backward(sync=i == len(batches) - 1)
                continue
            sync = self.ddp is None or i == len(batches) - 1  # all-reduce gradients once, after the last
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                waves = batch["waves"].to(self.device, non_blocking=True)
                lengths = batch["wave_lengths"].to(self.device, non_blocking=True)
                targets = batch["targets"].to(self.device, non_blocking=True)
                target_lengths = batch["target_lengths"].to(self.device, non_blocking=True)
                if views == 2:  # CR-CTC: the batch twice, each copy with its own masks, dropout and warps
                    waves, lengths = waves.repeat(2, 1), lengths.repeat(2)
                    targets, target_lengths = targets.repeat(2), target_lengths.repeat(2)
                with autocast(self.device, self.amp_dtype):
                    log_probs, out_lengths, *intermediate = model(waves, lengths, self.intermediate_layer)
                loss = self._ctc_loss(log_probs[..., :chars], out_lengths, targets, target_lengths) / views
                total = loss
                if intermediate:  # intermediate CTC: the same targets, read from a middle layer
                    inter_loss = self._ctc_loss(intermediate[0], out_lengths, targets, target_lengths) / views
                    weight = train.intermediate_ctc_weight
                    total = (1 - weight) * loss + weight * inter_loss
                    sums[2] += inter_loss.detach()
                if self.word_pieces is not None:  # the second output layer: the same text in word pieces
                    piece_targets = batch["piece_targets"].to(self.device, non_blocking=True)
                    piece_lengths = batch["piece_target_lengths"].to(self.device, non_blocking=True)
                    if views == 2:
                        piece_targets, piece_lengths = piece_targets.repeat(2), piece_lengths.repeat(2)
                    piece_loss = self._ctc_loss(log_probs[..., chars:], out_lengths, piece_targets,
                                                piece_lengths) / views
                    total = (1 - train.word_piece_weight) * total + train.word_piece_weight * piece_loss
                    sums[3] += piece_loss.detach()
                if views == 2:
                    consistency = consistency_loss(*log_probs.chunk(2), out_lengths.chunk(2)[0])
                    total = total + train.consistency_weight * consistency
                    sums[1] += consistency.detach()
                (total * scale).backward()
            sums[0] += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        if torch.isfinite(grad_norm):  # gradients are already the same on every rank: so is this choice
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        else:  # one bad batch must not destroy the weights
            log.warning("step %d: non-finite gradient, update skipped (batches from %s)", self.step,
                        batches[0]["ids"][:4])
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        loss_value, consistency_value, inter_value, piece_value = (
            all_reduce_sum(self.dist, sums) / utterances).tolist()
        metrics = {"loss": round(loss_value, 4), "grad_norm": round(float(grad_norm), 3), "lr": lr,
                   "audio_seconds": samples / SAMPLE_RATE, "utterances": int(utterances)}
        if views == 2:
            metrics["consistency"] = round(consistency_value, 4)
        if self.intermediate_layer:
            metrics["intermediate"] = round(inter_value, 4)
        if self.word_pieces is not None:
            metrics["word_pieces"] = round(piece_value, 4)
        return metrics

    def _ctc_loss(self, log_probs: torch.Tensor, out_lengths: torch.Tensor, targets: torch.Tensor,
                  target_lengths: torch.Tensor) -> torch.Tensor:
        """The CTC loss of (batch, frames, vocab) log-probs, summed over the batch."""
        return torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths,
                                            blank=self.vocab.blank, reduction="sum", zero_infinity=True)
