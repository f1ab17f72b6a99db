"""ONNX export and the onnxruntime backend: same log-probs as torch per item, same transcripts, safe files."""

import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'asr[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (a dependency: pip install -e .)")

import asr  # noqa: E402
from asr.checkpoint import MODEL_WEIGHTS, CheckpointError, load_model_files, save_model  # noqa: E402
from asr.cli import main as cli_main  # noqa: E402
from asr.features import FeatureConfig  # noqa: E402
from asr.model import DeepSpeech2, ModelConfig  # noqa: E402
from asr.serve import onnx_export  # noqa: E402
from asr.serve.onnx_export import (  # noqa: E402
    ONNX_FILE,
    ExportableNetwork,
    OnnxNetwork,
    export_onnx,
    max_difference,
    noise_batch,
)

from .conftest import TEXTS, tone_speech  # noqa: E402

ODD_LENGTHS = [16_000 + 7, 4001, 23_456, 9999, 1601]  # samples; another batch size than the export's


def tiny_model(seed: int) -> DeepSpeech2:
    """Random weights, 2 conv and 2 GRU layers; a sharpened output layer so that greedy paths are decisive."""
    torch.manual_seed(seed)
    cfg = ModelConfig(FeatureConfig(n_mels=40), conv_channels=[4, 4], conv_kernels=[[5, 11], [3, 5]],
                      conv_strides=[[2, 2], [1, 2]], gru_layers=2, gru_hidden=24, dropout=0.0)
    model = DeepSpeech2(cfg).eval()
    with torch.no_grad():
        model.head[1].weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx") / "model"
    save_model(folder, tiny_model(0), asr.Vocabulary())
    cli_main(["export", str(folder)])  # the default path: MODEL/model.onnx
    return folder


def per_item_torch(model: DeepSpeech2, waves: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(waves[i: i + 1, :n], lengths[i: i + 1])[0][0] for i, n in enumerate(lengths.tolist())]


def test_padded_batch_of_odd_lengths_matches_torch_per_item(model_dir):
    model, _, _ = load_model_files(model_dir)
    waves, lengths = noise_batch(ODD_LENGTHS, seed=0)
    with torch.no_grad():
        feats, frames = model.features(waves, lengths)
    got, got_frames = OnnxNetwork(model_dir / ONNX_FILE)(feats, frames)
    assert torch.equal(got_frames, model.output_lengths(lengths))
    for i, alone in enumerate(per_item_torch(model, waves, lengths)):
        assert torch.allclose(got[i, : len(alone)], alone, atol=1e-4), f"item {i} ({ODD_LENGTHS[i]} samples)"


def test_plain_reversal_would_leak_padding(model_dir, monkeypatch):
    """The check above can fail: reversing the padded batch whole lets padding reach short items."""
    model, _, _ = load_model_files(model_dir)
    waves, lengths = noise_batch(ODD_LENGTHS, seed=0)
    monkeypatch.setattr(onnx_export, "reverse_within", lambda x, lengths: x.flip(1))
    with torch.no_grad():
        naive, _ = ExportableNetwork(model)(*model.features(waves, lengths))
    shortest = int(lengths.argmin())
    alone = per_item_torch(model, waves, lengths)[shortest]
    assert (naive[shortest, : len(alone)] - alone).abs().max() > 1e-3


def test_transcripts_are_the_same_with_either_backend(model_dir, monkeypatch):
    audio = [tone_speech(t, seed=i) for i, t in enumerate(TEXTS)] + [tone_speech(" ".join(TEXTS) * 3, seed=9)]
    onnx_model = asr.load_model(model_dir, device="cpu")  # auto: model.onnx is there
    torch_model = asr.load_model(model_dir, device="cpu", backend="torch", precision="fp32")  # as onnx
    assert (onnx_model.backend, torch_model.backend) == ("onnx", "torch")
    options = dict(sample_rate=16_000, batch_size=3, chunk_seconds=4, overlap_seconds=1)  # windows, padding
    got, expected = onnx_model.transcribe(audio, **options), torch_model.transcribe(audio, **options)
    assert any(r.text for r in expected)
    assert [r.text for r in got] == [r.text for r in expected]
    assert [(w.start, w.end) for r in got for w in r.words] == [(w.start, w.end) for r in expected for w in r.words]
    monkeypatch.setenv("ASR_BACKEND", "torch")
    assert asr.load_model(model_dir, device="cpu").backend == "torch"


def test_export_is_atomic_and_checked(model_dir, monkeypatch):
    target = model_dir / ONNX_FILE
    before = target.read_bytes()

    def broken_export(module, args, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a graph")
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", broken_export)
        with pytest.raises(RuntimeError, match="disk full"):
            export_onnx(model_dir)
    with monkeypatch.context() as m:  # a graph that disagrees with torch never replaces the old one
        m.setattr(onnx_export, "max_difference", lambda *a: 0.5)
        with pytest.raises(RuntimeError, match="differs from torch"):
            export_onnx(model_dir)
    assert target.read_bytes() == before
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.onnx", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_cli_export_to_another_file(model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "net.onnx"
    cli_main(["export", str(model_dir), "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert OnnxNetwork(out).weights_sha256 == onnx_export.weights_digest(model_dir)


def test_corrupt_or_stale_model_onnx_gives_clear_errors(model_dir, tmp_path, caplog, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(model_dir, folder)
    (folder / ONNX_FILE).write_bytes(b"\x08\x07 not a protobuf graph")
    for backend in ("auto", "onnx"):
        with pytest.raises(CheckpointError, match=f"{folder / ONNX_FILE}: not a usable ONNX model"):
            asr.load_model(folder, device="cpu", backend=backend)
    assert asr.load_model(folder, device="cpu", backend="torch").backend == "torch"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["transcribe", str(model_dir.parent / "none.wav"), "--model", str(folder)])
    assert exit_info.value.code == 2 and f"{folder / ONNX_FILE}: not a usable ONNX model" in capsys.readouterr().err

    shutil.copy(model_dir / ONNX_FILE, folder / ONNX_FILE)  # then the weights change under it
    save_file({k: v.contiguous() for k, v in tiny_model(1).state_dict().items()}, str(folder / MODEL_WEIGHTS))
    assert asr.load_model(folder, device="cpu").backend == "torch"
    assert "exported from other weights" in caplog.text
    with pytest.raises(CheckpointError, match="exported from other weights"):
        asr.load_model(folder, device="cpu", backend="onnx")
    (folder / ONNX_FILE).unlink()
    with pytest.raises(CheckpointError, match="asr export"):
        asr.load_model(folder, device="cpu", backend="onnx")


def test_onnxruntime_threads_do_not_spin_between_runs(model_dir):
    """Spinning threads compete with torch's (features, speech check) for the cores between utterances."""
    def spins(network: OnnxNetwork) -> list[str]:
        options = network.session.get_session_options()
        return [options.get_session_config_entry(f"session.{pool}.allow_spinning") for pool in ("intra_op", "inter_op")]

    assert spins(asr.load_model(model_dir, device="cpu").onnx) == ["0", "0"]
    assert spins(OnnxNetwork(model_dir / ONNX_FILE, spinning=True)) == ["1", "1"]


def test_weights_exact_in_fp16_are_stored_as_fp16(model_dir, tmp_path):
    import onnx
    from onnx import TensorProto

    half = tmp_path / "half"
    model, vocab, _ = load_model_files(model_dir, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # what a shipped (fp16) model loads
    save_model(half, model, vocab)
    export_onnx(half)
    graph = onnx.load(str(half / ONNX_FILE)).graph
    halves = [i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT16]
    casts = [n.input[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in halves]
    assert halves and sorted(casts) == sorted(halves)
    assert (half / ONNX_FILE).stat().st_size < 0.75 * (model_dir / ONNX_FILE).stat().st_size
    assert not any(i.data_type == TensorProto.FLOAT16 for i in onnx.load(str(model_dir / ONNX_FILE)).graph.initializer)
    assert max_difference(model, OnnxNetwork(half / ONNX_FILE), *noise_batch([4001, 9999], seed=3)) < 1e-4
