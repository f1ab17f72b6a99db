import pytest

from asr.config import ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  gru_hidden: 128\n  features: {n_mels: 40}\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.conv_channels=[16]", "model.conv_kernels=[[3,3]]",
                             "model.conv_strides=[[2,2]]", "data.speed_perturb=[0.9,1.1]"])
    assert cfg.model.gru_hidden == 128 and cfg.model.features.n_mels == 40
    assert cfg.train.lr == 3e-4 and cfg.model.conv_channels == [16]
    assert cfg.data.speed_perturb == [0.9, 1.1]


def test_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*gru_hiden"):
        load_config(None, ["model.gru_hiden=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 'many'"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
