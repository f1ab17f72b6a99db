"""Checkpoints: a folder with `model.safetensors` + `model.json`, written atomically, loaded without pickle.

A training checkpoint adds `trainer.pt` (optimiser, scheduler, sampler position, RNG), read with
`torch.load(weights_only=True)`, so no code is ever executed when loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import DeepSpeech2, ModelConfig
from .text import Vocabulary

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
TRAINER_STATE = "trainer.pt"
DECODER_FILE = "decoder.json"  # beam search settings chosen by `asr lm tune`
LM_DIR = "lm"  # the model's language model
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or corrupt; names the path."""


def write_dir_atomically(final: Path, write: Any) -> None:
    """Call `write(tmp_dir)`, then move tmp_dir to `final`, replacing any old folder.

    The old folder is only removed after the new one is complete; a crash in between leaves
    `final.old`, which `recover_dir` puts back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes private folders; a model folder is ordinary
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a swap interrupted between its two renames."""
    old = Path(final).with_name(Path(final).name + ".old")
    if old.exists() and not Path(final).exists():
        os.replace(old, final)


def save_model(path: str | os.PathLike, model: DeepSpeech2, vocab: Vocabulary, metadata: dict | None = None,
               trainer_state: dict | None = None) -> None:
    """Write weights, config, vocabulary, normalisation (and optionally trainer state) to a folder."""
    meta = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(model.config),
        "vocabulary": vocab.tokens,
        "normalization": {
            "type": model.config.features.normalization,
            "mean": model.features.mean.tolist(),
            "std": model.features.std.tolist(),
        },
        "metadata": metadata or {},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / MODEL_WEIGHTS))
        (tmp / MODEL_META).write_text(json.dumps(meta, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)

    write_dir_atomically(Path(path), write)


def load_model_files(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> tuple[DeepSpeech2, Vocabulary, dict]:
    """Build the model from a checkpoint folder. Returns (model in eval mode, vocabulary, model.json)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    recover_dir(path)
    weights, meta_file = path / MODEL_WEIGHTS, path / MODEL_META
    for f in (weights, meta_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: not found (is {path} a model folder written by asr?)")
    try:
        meta = json.loads(meta_file.read_text())
        config = ModelConfig(**meta["config"])
        vocab = Vocabulary(meta["vocabulary"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: corrupt or incompatible model description ({e})") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: written by a newer asr (format {meta['format_version']})")
    model = DeepSpeech2(config)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{weights}: corrupt or does not match {meta_file} ({e})") from None
    return model.to(device).eval(), vocab, meta


def load_trainer_state(path: str | os.PathLike) -> dict:
    """Read `trainer.pt` with weights_only=True (no arbitrary code can run)."""
    f = Path(path) / TRAINER_STATE
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{f}: not found (not a training checkpoint)") from None
    except Exception as e:  # torch raises several types for corrupt files
        raise CheckpointError(f"{f}: corrupt trainer state ({e})") from None
