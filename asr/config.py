"""Experiment configuration: nested dataclasses filled from a YAML file plus `key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .augment import AugmentOptions
from .errors import ASRError
from .features import check_number
from .model import ModelConfig


@dataclass
class DataConfig(AugmentOptions):
    """Batching and loading; the augmentation fields (speed_perturb, pitch_*, noise_*, babble_*, reverb_*, eq_*,
    telephone_prob, codec_prob, gain_db, lead_silence_ms) come from AugmentOptions."""

    max_batch_seconds: float = 200.0  # padded audio seconds per batch
    max_batch_size: int = 64
    num_buckets: int = 20
    max_duration: float = 20.0  # longer training utterances are dropped
    sortagrad: bool = True
    num_workers: int = 2

    def __post_init__(self) -> None:
        """Check every value; errors name the key."""
        super().__post_init__()
        check_number("max_batch_seconds", self.max_batch_seconds, 0, 1e6, above_low=True)
        check_number("max_batch_size", self.max_batch_size, 1, 1_000_000, integer=True)
        check_number("num_buckets", self.num_buckets, 1, 10_000, integer=True)
        check_number("max_duration", self.max_duration, 0, 1e5, above_low=True)
        check_number("num_workers", self.num_workers, 0, 1024, integer=True)


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    epochs: int = 30
    max_steps: int = 0  # 0: no limit beyond epochs
    max_minutes: float = 0.0  # 0: no limit; else stop once this many minutes of fit() have passed (the step
    # in progress is finished, evaluated and checkpointed; a resumed run starts a new budget)
    time_schedule: bool = False  # with max_minutes: the cosine decay ends with the budget if that comes before
    # the last epoch (for a run that has minutes, not epochs: one GPU lease)
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    grad_clip: float = 10.0
    grad_accumulation: int = 1  # batches per optimiser step (per process)
    init_from: str = ""  # a model folder (e.g. a pretrained OUT/best) whose weights start a fresh run
    tokenizer: str = ""  # word pieces to emit instead of characters: a sentencepiece model (asr word-pieces) or a
    # model folder that has them; with init_from a character model, all but the output layer start from its weights
    word_pieces: str = ""  # a second output layer, over these word pieces (a sentencepiece model or a model folder
    # that has them), beside the characters; greedy decoding reads it, a beam search with an LM the characters
    word_piece_weight: float = 0.5  # with word_pieces, the loss is (1 - w) * the characters' CTC + w * the pieces'
    ema_decay: float = 0.0  # >0: evaluate and keep an exponential moving average of the weights (e.g. 0.998)
    consistency_weight: float = 0.0  # >0: CR-CTC: each utterance twice, differently augmented, the two views'
    # posteriors pulled together with this weight (e.g. 0.2; asr/train/consistency.py); twice the compute per step
    intermediate_ctc_weight: float = 0.0  # >0: intermediate CTC: the loss is (1 - w) * CTC + w * the CTC of the
    # output head applied to a middle GRU layer's output (Lee and Watanabe, 2021); no new weights
    intermediate_ctc_layer: int = 0  # that GRU layer, 1-based; 0: the middle one, (gru_layers + 1) // 2
    compile: bool = False  # torch.compile the convolutional front (dynamic shapes)
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    eval_every_steps: int = 0  # 0: at the end of every epoch
    checkpoint_every_steps: int = 0  # 0: with every evaluation
    log_every_steps: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...

    def __post_init__(self) -> None:
        """Check every value; errors name the key."""
        check_number("epochs", self.epochs, 1, 1_000_000, integer=True)
        for key in ("max_steps", "warmup_steps", "eval_every_steps", "checkpoint_every_steps"):
            check_number(key, getattr(self, key), 0, 10**12, integer=True)
        check_number("max_minutes", self.max_minutes, 0, 1e9)
        check_number("lr", self.lr, 0, 10)
        check_number("weight_decay", self.weight_decay, 0, 10)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("grad_clip", self.grad_clip, 0, 1e12, above_low=True)
        check_number("grad_accumulation", self.grad_accumulation, 1, 100_000, integer=True)
        check_number("ema_decay", self.ema_decay, 0, 1)
        check_number("consistency_weight", self.consistency_weight, 0, 1000)
        check_number("intermediate_ctc_weight", self.intermediate_ctc_weight, 0, 1)
        check_number("intermediate_ctc_layer", self.intermediate_ctc_layer, 0, 10_000, integer=True)
        check_number("word_piece_weight", self.word_piece_weight, 0, 1)
        if self.word_pieces and self.tokenizer:
            raise ValueError("word_pieces: a second output layer beside characters; with tokenizer the first one "
                             "already emits word pieces: set one of the two")
        if self.word_pieces and self.word_piece_weight in (0, 1):
            raise ValueError(f"word_piece_weight: must be between 0 and 1 (0 never trains the word pieces, 1 never "
                             f"the characters), got {self.word_piece_weight}")
        if self.ema_decay == 1:
            raise ValueError("ema_decay: must be below 1 (1 never updates the average), got 1")
        if self.intermediate_ctc_weight == 1:
            raise ValueError("intermediate_ctc_weight: must be below 1 (1 never trains the output layer), got 1")
        check_number("log_every_steps", self.log_every_steps, 1, 10**12, integer=True)
        check_number("keep_checkpoints", self.keep_checkpoints, 1, 10_000, integer=True)
        check_number("seed", self.seed, 0, 2**63 - 1, integer=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device: not a device name (auto, cpu, cuda, cuda:1, ...): {self.device!r}") from None


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ASRError, ValueError):
    """An unknown key, or a value of the wrong type or out of range, in a configuration; names the key."""


def from_dict(cls: type, values: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and values out of range.

    `where` is the keys' prefix in messages (e.g. "model."); an empty section (None) means the defaults.
    """
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(k) for k in values if k not in names]
    if unknown:
        raise ConfigError("; ".join(_unknown_key(where, k, names) for k in unknown))
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}{name}"
        nested = dataclasses.is_dataclass(hint)
        kwargs[name] = from_dict(hint, value, key + ".") if nested else _coerce(hint, value, key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own checks: the message starts with the field's name
        raise ConfigError(f"{where}{e}") from None


def _unknown_key(where: str, key: str, names: list[str]) -> str:
    """'unknown key train.lr_rate; did you mean train.lr?' (or the known keys when none is close)."""
    close = [n for n in names if key.startswith(n + "_") or n.startswith(key)]  # lr_rate -> lr
    close += [n for n in difflib.get_close_matches(key, names, n=3, cutoff=0.6) if n not in close]
    if close:
        return f"unknown key {where}{key}; did you mean {' or '.join(where + c for c in close)}?"
    return f"unknown key {where}{key}; known keys: {', '.join(where + n for n in sorted(names))}"


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a field type; accept ints and numeric strings (YAML reads 3e-4 as text) for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None:
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, key) for v in value]
    if hint is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (bool, str) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def apply_override(values: dict, override: str) -> None:
    """Apply one `section.key=value` (value parsed as YAML) to a nested dict, in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = values
    for p in parts[:-1]:
        if node.get(p) is None:  # absent, or an empty section in the YAML file
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Defaults, then the YAML file (if any), then the overrides in order."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read configuration ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected sections (model, data, train), got {values!r}")
    for o in overrides:
        apply_override(values, o)
    try:
        return from_dict(ExperimentConfig, values)
    except TypeError as e:
        raise ConfigError(f"{path or 'configuration'}: {e}") from None


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
