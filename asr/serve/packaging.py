"""The model that ships inside the package: `asr.load_model()` with no path loads it, offline.

It lives in `asr/default_model/` (package data): fp16 safetensors weights, model.json, the network as
model.onnx (onnxruntime runs it on the CPU), and when it has one, its language model `lm/` and tuned beam
settings `decoder.json`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..checkpoint import DECODER_FILE, LM_DIR, MODEL_META, MODEL_WEIGHTS, CheckpointError
from ..files import write_dir_atomically
from .onnx_export import export_onnx

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"


def default_model_dir() -> Path | None:
    """The shipped model folder, or None when this installation has none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / MODEL_WEIGHTS).is_file() else None


def ship_model(model_dir: str | os.PathLike, dest: str | os.PathLike = DEFAULT_MODEL_DIR,
               lm: str | os.PathLike | None = None, onnx: bool = True) -> int:
    """Copy a trained model folder to `dest` with fp16 weights (half the size; loading casts back).

    The LM comes from `lm`, else the folder's own lm/; decoder.json comes along. With `onnx`, the fp16
    network is exported beside them as model.onnx (needs the onnx package: without it, an ImportError and `dest`
    untouched). Returns the bytes written.
    """
    src = Path(model_dir)
    for f in (src / MODEL_WEIGHTS, src / MODEL_META):
        if not f.is_file():
            raise CheckpointError(f"{f}: not found (is {src} a model folder?)")
    lm_dir = Path(lm) if lm is not None else (src / LM_DIR if (src / LM_DIR).is_dir() else None)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in load_file(src / MODEL_WEIGHTS).items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / MODEL_WEIGHTS), metadata={"format": "pt", "dtype": "float16"})
        shutil.copy2(src / MODEL_META, tmp / MODEL_META)
        if (src / DECODER_FILE).is_file():
            shutil.copy2(src / DECODER_FILE, tmp / DECODER_FILE)
        if lm_dir is not None:
            shutil.copytree(lm_dir, tmp / LM_DIR)
        if onnx:
            export_onnx(tmp)

    write_dir_atomically(Path(dest), write)
    return sum(f.stat().st_size for f in Path(dest).rglob("*") if f.is_file())

