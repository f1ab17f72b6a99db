import os
import stat

import pytest
import torch
from safetensors.torch import load_file

import asr
from asr.checkpoint import CheckpointError
from asr.serve.onnx_export import ONNX_FILE, OnnxNetwork, weights_digest
from asr.serve.packaging import DEFAULT_MODEL_DIR, ship_model


def test_shipped_model_is_half_size_and_transcribes_alike(trained_tiny_model, tone_corpus, tmp_path, monkeypatch):
    lm = tmp_path / "lm_src"
    lm.mkdir()
    (lm / "words.txt").write_text("a\n")
    dest = tmp_path / "pkg" / "default_model"
    size = ship_model(trained_tiny_model, dest, lm=lm)
    assert size == sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    src_weights = (trained_tiny_model / "model.safetensors").stat().st_size
    assert (dest / "model.safetensors").stat().st_size < 0.6 * src_weights
    weights = load_file(dest / "model.safetensors").values()
    assert all(v.dtype == torch.float16 for v in weights if v.is_floating_point())
    assert stat.S_IMODE((dest / "lm").stat().st_mode) & 0o555 == 0o555  # readable and enterable by everyone
    assert (dest / "lm" / "words.txt").read_text() == "a\n"
    assert OnnxNetwork(dest / ONNX_FILE).weights_sha256 == weights_digest(dest)  # exported from the fp16 weights
    assert not (tmp_path / "no_onnx" / ONNX_FILE).exists() and ship_model(trained_tiny_model, tmp_path / "no_onnx",
                                                                           onnx=False)
    assert sorted(p.name for p in (tmp_path / "no_onnx").iterdir()) == ["model.json", "model.safetensors"]

    audio = [line.split('"audio_filepath": "')[1].split('"')[0] for line in tone_corpus.read_text().splitlines()]
    audio = [a if os.path.isabs(a) else str(tone_corpus.parent / a) for a in audio]
    full = [t.text for t in asr.load_model(trained_tiny_model).transcribe(audio)]
    monkeypatch.delenv("ASR_MODEL", raising=False)
    monkeypatch.setattr("asr.serve.packaging.DEFAULT_MODEL_DIR", dest)
    (dest / "lm").rename(tmp_path / "lm_moved")  # the fake LM is not a real one: load without it
    shipped = asr.load_model(device="cpu")
    assert (shipped.backend, shipped.precision) == ("onnx", "fp32")
    assert [t.text for t in shipped.transcribe(audio)] == full
    monkeypatch.setenv("ASR_MODEL", str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="elsewhere"):  # the environment variable wins
        asr.load_model()


def test_shipping_a_folder_that_is_not_a_model_fails_and_keeps_the_old_one(trained_tiny_model, tmp_path):
    dest = tmp_path / "default_model"
    ship_model(trained_tiny_model, dest)
    before = sorted(p.name for p in dest.iterdir())
    with pytest.raises(CheckpointError, match="not found"):
        ship_model(tmp_path / "nothing", dest)
    assert sorted(p.name for p in dest.iterdir()) == before


def test_the_shipped_model_runs_onnxruntime_on_the_cpu(monkeypatch):
    """Its model.onnx was exported from its current weights (else `auto` falls back to torch, slower)."""
    monkeypatch.delenv("ASR_MODEL", raising=False)
    monkeypatch.delenv("ASR_BACKEND", raising=False)
    monkeypatch.delenv("ASR_PRECISION", raising=False)
    assert OnnxNetwork(DEFAULT_MODEL_DIR / ONNX_FILE).weights_sha256 == weights_digest(DEFAULT_MODEL_DIR)
    model = asr.load_model(device="cpu")
    assert (model.backend, model.precision) == ("onnx", "fp32")
