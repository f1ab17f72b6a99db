import pytest
import torch

from asr.checkpoint import CheckpointError, load_model_files, load_trainer_state, recover_dir, save_model
from asr.model import DeepSpeech2, ModelConfig
from asr.text import Vocabulary


def _model(normalization="global"):
    torch.manual_seed(0)
    cfg = ModelConfig(gru_layers=1, gru_hidden=32, conv_channels=[4], conv_kernels=[[5, 11]], conv_strides=[[2, 2]])
    cfg.features.normalization = normalization
    model = DeepSpeech2(cfg).eval()
    model.features.set_global_stats(torch.randn(80), torch.rand(80) + 0.5)
    return model


def test_save_load_gives_identical_outputs(tmp_path):
    model = _model()
    save_model(tmp_path / "m", model, Vocabulary(), {"note": "x"}, trainer_state={"step": 3, "t": torch.ones(2)})
    loaded, vocab, meta = load_model_files(tmp_path / "m")
    waves = torch.randn(2, 8000)
    lengths = torch.tensor([8000, 6000])
    assert torch.equal(model(waves, lengths)[0], loaded(waves, lengths)[0])
    assert meta["metadata"]["note"] == "x" and vocab.tokens == Vocabulary().tokens
    assert meta["normalization"]["type"] == "global" and len(meta["normalization"]["mean"]) == 80
    assert load_trainer_state(tmp_path / "m")["step"] == 3


def test_overwrite_is_atomic_and_failure_keeps_old(tmp_path):
    model = _model()
    save_model(tmp_path / "m", model, Vocabulary())
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(AttributeError, match="pickle"):
        save_model(tmp_path / "m", model, Vocabulary(), trainer_state={"bad": lambda: 0})  # cannot be saved
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != "m"]  # no temp folders left behind
    # a crash between the two renames leaves m.old; it is put back
    (tmp_path / "m").rename(tmp_path / "m.old")
    recover_dir(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors: not found"):
        load_model_files(tmp_path)
    save_model(tmp_path / "m", _model(), Vocabulary())
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_model_files(tmp_path / "m")
    save_model(tmp_path / "m", _model(), Vocabulary())
    (tmp_path / "m" / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.json: corrupt"):
        load_model_files(tmp_path / "m")
    with pytest.raises(CheckpointError, match="trainer.pt: not found"):
        load_trainer_state(tmp_path / "m")


def test_trainer_state_refuses_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    save_model(tmp_path / "m", _model(), Vocabulary())
    torch.save({"x": Evil()}, tmp_path / "m" / "trainer.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="corrupt trainer state"):
        load_trainer_state(tmp_path / "m")
