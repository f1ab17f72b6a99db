"""Training checkpoints under OUT/checkpoints: step-NNNNNNNN folders, rotation, RNG state, resume checks, leftovers.

A checkpoint is a model folder (asr.checkpoint.save_model) with `trainer.pt` added: optimiser, scheduler,
position in the epoch, best dev WER and every rank's RNG state.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import (
    CheckpointError,
    architecture_differences,
    load_model_files,
    read_model_json,
    save_model,
    word_pieces_of,
)
from ..files import discard_dir, remove_leftovers
from ..model import ModelConfig
from ..text import Vocabulary

CHECKPOINTS = "checkpoints"  # the folder under OUT
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint written after optimiser step `step`."""
    return root / f"step-{step:08d}"


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder was written at (from its name)."""
    return int(_STEP_DIR.match(folder.name).group(1))


def checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders in `root`, oldest first (none when `root` is not a folder)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=checkpoint_step)


def last_checkpoints(run: Path, count: int) -> list[Path]:
    """The `count` newest checkpoint folders of the training run `run` (its OUT folder), oldest first; a
    CheckpointError when it has fewer."""
    found = checkpoints(run / CHECKPOINTS)
    if len(found) < count:
        raise CheckpointError(f"{run}: has {len(found)} checkpoint(s) in {CHECKPOINTS}/, {count} were asked for "
                              "(train with train.keep_checkpoints=N to keep more)")
    return found[-count:]


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint folder of the highest step in `root`, or None."""
    steps = checkpoints(root)
    return steps[-1] if steps else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoint folders."""
    for old in checkpoints(root)[:-keep]:
        discard_dir(old)  # renamed first: a kill never leaves a half-deleted step-* folder


def discard_checkpoints(out: Path) -> None:
    """Delete every checkpoint of the run in `out` (starting afresh)."""
    if (out / CHECKPOINTS).is_dir():
        discard_dir(out / CHECKPOINTS)  # a kill midway must not leave half a checkpoint


def remove_kill_leftovers(out: Path, *names: str) -> list[Path]:
    """Remove what kills left in `out` for `names` and the checkpoints: half-written folders and files,
    swapped-out old copies (put back where the new one is missing). Returns what was removed."""
    return remove_leftovers(out, *names, CHECKPOINTS) + remove_leftovers(out / CHECKPOINTS, "step-*")


def network_differences(folder: Path, config: ModelConfig, vocab: Vocabulary,
                        word_pieces: Vocabulary | None = None) -> list[str]:
    """What makes the network in `folder` (its model.json) another than `config` with `vocab` (and `word_pieces`,
    a second output layer's): each differing setting ("KEY THERE there, NOW now"), "the vocabulary" and "the word
    pieces"; empty when its weights fit this network."""
    saved, saved_vocab, meta = read_model_json(folder)
    differ = [f"{k} {there!r} there, {now!r} now"
              for k, (now, there) in sorted(architecture_differences(config, saved).items())]
    if saved_vocab.tokens != vocab.tokens:
        differ.append("the vocabulary")
    saved_pieces = word_pieces_of(meta)
    if (saved_pieces and saved_pieces.tokens) != (word_pieces and word_pieces.tokens):
        differ.append("the word pieces")
    return differ


def check_resumable(checkpoint: Path, out: Path, config: ModelConfig, vocab: Vocabulary,
                    word_pieces: Vocabulary | None = None) -> None:
    """Refuse, before anything is written, to resume from a checkpoint of another model or vocabulary."""
    differ = network_differences(checkpoint, config, vocab, word_pieces)
    if differ:
        raise CheckpointError(f"{out}: cannot resume from {checkpoint.name}, model settings differ: "
                              f"{'; '.join(differ)}. Train with the checkpoint's settings, or use --restart "
                              "(discards that run) or another --out")


def average_checkpoints(folders: Sequence[Path], out: Path) -> Path:
    """Write the mean of the weights in `folders` (checkpoints or model folders of one network: the same
    settings and vocabulary) to the model folder `out`, as icefall's `--avg` does with a run's last
    checkpoints; the average of the last few often scores better than any one of them.

    Integer buffers (batch-norm step counts) and model.json come from the last folder; `out` gets no trainer
    state, LM or decoder.json. `out` may not be one of `folders` (nothing written is replaced by the mean).
    """
    folders = [Path(f) for f in folders]
    if not folders:
        raise CheckpointError("nothing to average: no checkpoint folders given")
    out = Path(out)
    if any(out.resolve() == f.resolve() for f in folders):
        raise CheckpointError(f"{out}: is one of the folders being averaged; write the average elsewhere")
    model, vocab, meta = load_model_files(folders[-1])
    word_pieces = word_pieces_of(meta)
    for folder in folders[:-1]:  # every description checked before any more weights are read
        differ = network_differences(folder, model.config, vocab, word_pieces)
        if differ:
            raise CheckpointError(f"{folder}: not the same network as {folders[-1]} ({'; '.join(differ)}); only "
                                  "checkpoints of one model can be averaged")
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    state = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    for folder in folders[:-1]:
        other, _, _ = load_model_files(folder)
        for k, v in other.state_dict().items():
            if v.is_floating_point():
                state[k] += v.to(torch.float64)
    model.load_state_dict({k: (v / len(folders)).to(dtypes[k]) if v.is_floating_point() else v
                           for k, v in state.items()})
    metadata = {**meta.get("metadata", {}), "averaged_from": [str(f) for f in folders]}
    save_model(out, model, vocab, metadata, word_pieces=word_pieces)
    return out


def rng_state(device: torch.device) -> dict:
    """This process's random number generator states (torch, CUDA on `device`, Python)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate()}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` returned (the CUDA state only on a CUDA device)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def saved_rng_states(trainer_state: dict) -> list[dict]:
    """Every rank's RNG state in a checkpoint's trainer state, in rank order."""
    if "rng" in trainer_state:
        return trainer_state["rng"]
    # written before distributed training: one process's state, under other keys
    return [{"torch": trainer_state["torch_rng"], "cuda": None, "python": trainer_state["python_rng"]}]
