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


def _run_with_checkpoints(run, seeds):
    """A run folder whose checkpoints hold differently initialised copies of one small network."""
    from asr.train.checkpoints import CHECKPOINTS, checkpoint_dir

    models = []
    for step, seed in zip((50, 100, 150, 1000), seeds):
        model = _model()
        torch.manual_seed(seed)
        for p in model.parameters():
            p.data.normal_()
        save_model(checkpoint_dir(run / CHECKPOINTS, step), model, Vocabulary(), {"step": step},
                   trainer_state={"step": step})
        models.append(model)
    return models


def test_average_of_checkpoints_is_the_mean_of_their_weights(tmp_path):
    from asr.train.checkpoints import CHECKPOINTS, average_checkpoints, checkpoints

    models = _run_with_checkpoints(tmp_path / "run", [1, 2, 3, 4])
    found = checkpoints(tmp_path / "run" / CHECKPOINTS)
    assert [f.name for f in found] == ["step-00000050", "step-00000100", "step-00000150", "step-00001000"]
    average_checkpoints(found[-3:], tmp_path / "avg")
    averaged, _, meta = load_model_files(tmp_path / "avg")
    for name, value in averaged.state_dict().items():
        expected = sum(m.state_dict()[name].double() for m in models[-3:]) / 3
        if value.is_floating_point():
            assert torch.allclose(value.double(), expected, atol=1e-6), name
    weight = "rnns.0.gru.weight_hh_l0"
    assert not torch.allclose(averaged.state_dict()[weight], models[-1].state_dict()[weight])
    assert meta["metadata"]["step"] == 1000 and len(meta["metadata"]["averaged_from"]) == 3
    assert not (tmp_path / "avg" / "trainer.pt").exists()


def test_average_refuses_other_networks_and_overwriting_an_input(tmp_path):
    from asr.train.checkpoints import average_checkpoints

    save_model(tmp_path / "a", _model(), Vocabulary())
    other = _model()
    other_cfg = ModelConfig(gru_layers=1, gru_hidden=16, conv_channels=[4], conv_kernels=[[5, 11]],
                            conv_strides=[[2, 2]])
    save_model(tmp_path / "b", DeepSpeech2(other_cfg), Vocabulary())
    with pytest.raises(CheckpointError, match=r"b: not the same network"):
        average_checkpoints([tmp_path / "b", tmp_path / "a"], tmp_path / "avg")
    before = (tmp_path / "a" / "model.safetensors").read_bytes()
    save_model(tmp_path / "c", other, Vocabulary())
    with pytest.raises(CheckpointError, match="one of the folders being averaged"):
        average_checkpoints([tmp_path / "a", tmp_path / "c"], tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == before
    with pytest.raises(CheckpointError, match="not found"):
        average_checkpoints([tmp_path / "a", tmp_path / "missing"], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_cli_averages_the_last_checkpoints_of_a_run(tmp_path, capsys):
    from asr.cli import main

    models = _run_with_checkpoints(tmp_path / "run", [1, 2, 3, 4])
    main(["average", "--run", str(tmp_path / "run"), "--last", "2", "--out", str(tmp_path / "avg")])
    assert "step-00000150 step-00001000" in capsys.readouterr().out
    averaged, _, _ = load_model_files(tmp_path / "avg")
    weight = "rnns.0.gru.weight_ih_l0"
    expected = (models[2].state_dict()[weight] + models[3].state_dict()[weight]) / 2
    assert torch.allclose(averaged.state_dict()[weight], expected, atol=1e-6)
    with pytest.raises(SystemExit):
        main(["average", "--run", str(tmp_path / "run"), "--last", "5", "--out", str(tmp_path / "avg5")])
    assert "has 4 checkpoint(s)" in capsys.readouterr().err and not (tmp_path / "avg5").exists()
