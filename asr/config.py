"""Experiment configuration: nested dataclasses filled from a YAML file plus `key=value` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .augment import AugmentOptions
from .model import ModelConfig


@dataclass
class DataConfig(AugmentOptions):
    """Batching and loading; the augmentation fields (speed_perturb, noise_*, babble_*, reverb_*, eq_*,
    telephone_prob, codec_prob) come from AugmentOptions."""

    max_batch_seconds: float = 200.0  # padded audio seconds per batch
    max_batch_size: int = 64
    num_buckets: int = 20
    max_duration: float = 20.0  # longer training utterances are dropped
    sortagrad: bool = True
    num_workers: int = 2


@dataclass
class TrainConfig:
    epochs: int = 30
    max_steps: int = 0  # 0: no limit beyond epochs
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    grad_clip: float = 10.0
    grad_accumulation: int = 1  # batches per optimiser step (per process)
    init_from: str = ""  # a model folder (e.g. a pretrained OUT/best) whose weights start a fresh run
    ema_decay: float = 0.0  # >0: evaluate and keep an exponential moving average of the weights (e.g. 0.998)
    compile: bool = False  # torch.compile the convolutional front (dynamic shapes)
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    eval_every_steps: int = 0  # 0: at the end of every epoch
    checkpoint_every_steps: int = 0  # 0: with every evaluation
    log_every_steps: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in a configuration."""


def from_dict(cls: type, values: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}{name}"
        kwargs[name] = from_dict(hint, value, key + ".") if dataclasses.is_dataclass(hint) else _coerce(hint, value, key)
    return cls(**kwargs)


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
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Defaults, then the YAML file (if any), then the overrides in order."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read configuration ({e})") from None
    for o in overrides:
        apply_override(values, o)
    try:
        return from_dict(ExperimentConfig, values)
    except TypeError as e:
        raise ConfigError(f"{path or 'configuration'}: {e}") from None


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
