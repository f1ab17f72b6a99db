"""Checkpoints: a folder with `model.safetensors` + `model.json`, written atomically, loaded without pickle.

A training checkpoint adds `trainer.pt` (optimiser, scheduler, sampler position, RNG), read with
`torch.load(weights_only=True)`, so no code is ever executed when loading. Every value of model.json is
checked before a model is built from it, and kills or a full disk never leave a damaged folder under a
checkpoint's name (`files.remove_leftovers` deletes what they leave beside it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import ASRError
from .features import TRAINING_ONLY_KEYS
from .files import recover_dir, write_dir_atomically  # noqa: F401 - re-exported
from .model import DeepSpeech2, ModelConfig
from .text import Vocabulary
from .word_pieces import WordPieceVocabulary

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
TRAINER_STATE = "trainer.pt"
DECODER_FILE = "decoder.json"  # beam search settings chosen by `asr lm tune`
LM_DIR = "lm"  # the model's language model
FORMAT_VERSION = 1


class CheckpointError(ASRError, ValueError):
    """A checkpoint folder that is missing, incomplete or corrupt, or cannot be written; names the path."""


@contextlib.contextmanager
def reported_write_errors(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn an OSError while writing `path` (a full disk, a read-only folder) into a CheckpointError naming it."""
    try:
        yield
    except OSError as e:
        reason = e.strerror.lower() if e.strerror else str(e)
        raise CheckpointError(f"cannot write {what} {path}: {reason} (what was there before is kept)") from None


def save_model(path: str | os.PathLike, model: DeepSpeech2, vocab: Vocabulary, metadata: dict | None = None,
               trainer_state: dict | None = None, word_pieces: WordPieceVocabulary | None = None) -> None:
    """Write weights, config, vocabulary, normalisation (and optionally trainer state) to a folder; `word_pieces`:
    the vocabulary of a second output layer (ModelConfig.word_piece_vocab_size).

    The folder is replaced atomically; when it cannot be written (e.g. no space left on device) the
    previous version stays and a CheckpointError says why.
    """
    meta = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(model.config),
        "vocabulary": vocab.tokens,
        **({"tokenizer": vocab.to_json()} if isinstance(vocab, WordPieceVocabulary) else {}),
        **({"word_pieces": {"vocabulary": word_pieces.tokens, "tokenizer": word_pieces.to_json()}}
           if word_pieces is not None else {}),
        "normalization": {
            "type": model.config.features.normalization,
            "mean": model.features.mean.tolist(),
            "std": model.features.std.tolist(),
        },
        "metadata": metadata or {},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # serialised in memory, then written by Python: a full disk is then an OSError with its errno, where
    # safetensors and torch.save writing the files themselves report it as opaque library errors
    trainer_bytes = None
    if trainer_state is not None:
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        trainer_bytes = buffer.getbuffer()

    def write(tmp: Path) -> None:
        (tmp / MODEL_WEIGHTS).write_bytes(safetensors.torch.save(state))
        (tmp / MODEL_META).write_text(json.dumps(meta, indent=2))
        if trainer_bytes is not None:
            (tmp / TRAINER_STATE).write_bytes(trainer_bytes)

    with reported_write_errors(path, "checkpoint"):
        write_dir_atomically(Path(path), write)


def read_model_json(folder: str | os.PathLike) -> tuple[ModelConfig, Vocabulary, dict]:
    """Read and check a model folder's model.json: (model config, vocabulary, the whole description).

    Every value is checked before anything is built from it; a problem is a CheckpointError naming the key.
    """
    meta_file = Path(folder) / MODEL_META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file}: not found (is {folder} a model folder written by asr?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: corrupt, not readable JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f'{meta_file}: corrupt, not a model description (no "config" object)')
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{meta_file}: corrupt, format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: written by a newer asr (format {version})")
    try:
        config = ModelConfig(**meta["config"])
    except TypeError as e:  # an unknown key
        raise CheckpointError(f"{meta_file}: corrupt or incompatible model description (config: {e})") from None
    except ValueError as e:
        raise CheckpointError(f"{meta_file}: invalid model description: config.{e}") from None
    tokens = meta.get("vocabulary")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{meta_file}: corrupt, vocabulary must be a list of strings, got {tokens!r}")
    try:
        vocab = WordPieceVocabulary.from_json(meta["tokenizer"], tokens) if "tokenizer" in meta else Vocabulary(tokens)
    except ValueError as e:
        raise CheckpointError(f"{meta_file}: invalid vocabulary: {e}") from None
    if config.vocab_size != len(vocab):
        raise CheckpointError(f"{meta_file}: invalid model description: config.vocab_size is {config.vocab_size} "
                              f"but the vocabulary has {len(vocab)} tokens")
    pieces = word_pieces_of(meta, meta_file)
    count = len(pieces) if pieces else 0
    if config.word_piece_vocab_size != count:
        raise CheckpointError(f"{meta_file}: invalid model description: config.word_piece_vocab_size is "
                              f"{config.word_piece_vocab_size} but word_pieces has {count} tokens")
    return config, vocab, meta


def word_pieces_of(meta: dict, meta_file: str | os.PathLike = MODEL_META) -> WordPieceVocabulary | None:
    """The vocabulary of a model's second output layer (model.json's "word_pieces"), None if it has none."""
    if "word_pieces" not in meta:
        return None
    entry = meta["word_pieces"]
    tokens = entry.get("vocabulary") if isinstance(entry, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f'{meta_file}: corrupt, word_pieces must be {{"vocabulary": [strings], "tokenizer": '
                              f'...}}, got {str(entry)[:80]!r}')
    try:
        return WordPieceVocabulary.from_json(entry.get("tokenizer"), tokens)
    except ValueError as e:
        raise CheckpointError(f"{meta_file}: invalid word_pieces: {e}") from None


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
    config, vocab, meta = read_model_json(path)
    model = DeepSpeech2(config)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{weights}: corrupt or does not match {meta_file} ({e})") from None
    return model.to(device).eval(), vocab, meta


def architecture_differences(mine: ModelConfig, theirs: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """The model settings that make weights incompatible, where the two differ: {key: (mine, theirs)}.

    Dropout and the feature augmentation settings (TRAINING_ONLY_KEYS) may change between runs; everything else
    shapes the weights or what they mean.
    """
    a, b = dataclasses.asdict(mine), dataclasses.asdict(theirs)
    differ = {k: (a[k], b[k]) for k in a if k not in ("dropout", "features") and a[k] != b[k]}
    for k in a["features"]:
        if k not in TRAINING_ONLY_KEYS and a["features"][k] != b["features"][k]:
            differ[f"features.{k}"] = (a["features"][k], b["features"][k])
    return differ


def load_trainer_state(path: str | os.PathLike) -> dict:
    """Read `trainer.pt` with weights_only=True (no arbitrary code can run)."""
    f = Path(path) / TRAINER_STATE
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{f}: not found (not a training checkpoint)") from None
    except Exception as e:  # torch raises several types for corrupt files
        raise CheckpointError(f"{f}: corrupt trainer state ({e})") from None
