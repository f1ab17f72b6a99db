"""The unidirectional model (one-way GRUs + lookahead convolution, causal conv front) beside the default one."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

import asr
from asr.checkpoint import CheckpointError, load_model_files, read_model_json, save_model
from asr.config import ConfigError, load_config
from asr.features import FeatureConfig
from asr.model import DeepSpeech2, ModelConfig
from asr.serve.onnx_export import noise_batch
from asr.train.trainer import Trainer

from .conftest import TEXTS, TINY_OVERRIDES, tone_speech

# (conv kernels, conv strides, lookahead_frames, future feature frames worked out by hand from the rule in
# ModelConfig.conv_time_padding: a budget of lookahead * stride feature frames, earlier layers first)
CAUSAL_CASES = [
    ([[11, 21], [11, 11]], [[2, 2], [1, 2]], 2, 4 + 2 * 2),  # layer 1 reads 4 ahead, layer 2 none
    ([[4, 5], [3, 3], [5, 3]], [[2, 2], [3, 1], [1, 1]], 1, 1 + 1 * 2 + 0 + 1 * 6),  # even kernel, stride 3
    ([[11, 21], [11, 11]], [[2, 2], [1, 2]], 0, 0),  # fully causal
    ([[11, 21], [11, 11]], [[2, 2], [1, 2]], 16, 5 + 5 * 2 + 16 * 2),  # the budget exceeds symmetric padding
]


def one_way(kernels, strides, lookahead: int, seed: int = 0, end_silence_ms: float = 0.0, **features) -> DeepSpeech2:
    """A small random unidirectional model in eval mode, its lookahead weights random too (not the identity)."""
    torch.manual_seed(seed)
    features = FeatureConfig(**{"n_mels": 40, "normalization": "none", **features})
    cfg = ModelConfig(features, conv_channels=[6] * len(kernels), conv_kernels=kernels, conv_strides=strides,
                      gru_layers=2, gru_hidden=24, dropout=0.0, bidirectional=False, lookahead_frames=lookahead,
                      end_silence_ms=end_silence_ms)
    model = DeepSpeech2(cfg).eval()
    if lookahead:
        torch.nn.init.normal_(model.lookahead.conv.weight)
    return model


def network(model: DeepSpeech2, feats: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """The model's layers after the features (as DeepSpeech2.forward runs them), before the softmax."""
    x, lengths = model.conv(feats.transpose(1, 2), frames)
    for rnn in model.rnns:
        x = rnn(x, lengths)
    return model.head(model.lookahead(x, lengths))


# ---------------------------------------------------------------- the default model is unchanged


def test_default_model_is_the_bidirectional_one():
    cfg = ModelConfig(conv_channels=[4], conv_kernels=[[3, 3]], conv_strides=[[1, 1]], gru_layers=1, gru_hidden=8)
    assert (cfg.bidirectional, cfg.lookahead_frames, cfg.future_feature_frames, cfg.future_samples) == (
        True, 0, None, None)
    keys = set(DeepSpeech2(cfg).state_dict())
    features = {"features.mean", "features.std", "features.mel.spectrogram.window", "features.mel.mel_scale.fb"}
    conv = {f"conv.layers.0.{k}" for k in ("conv.weight", "norm.weight", "norm.bias", "norm.running_mean",
                                           "norm.running_var", "norm.num_batches_tracked")}
    gru = {f"rnns.0.gru.{w}_l0{d}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for d in ("", "_reverse")}
    head = {"rnns.0.norm.weight", "rnns.0.norm.bias", "head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"}
    assert keys == features | conv | gru | head


def reference_bidirectional(model: DeepSpeech2, wave: torch.Tensor) -> torch.Tensor:
    """The default architecture written out for one utterance: symmetric conv padding, both GRU directions."""
    feats, _ = model.features(wave[None], torch.tensor([len(wave)]))
    x = feats.transpose(1, 2)[:, None]
    for layer in model.conv.layers:
        conv, norm = layer["conv"], layer["norm"]
        kt, kf = conv.kernel_size
        x = F.conv2d(x, conv.weight, stride=conv.stride, padding=(kt // 2, kf // 2))
        x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)
        x = F.hardtanh(x, 0, 20)
    x = x.permute(0, 2, 1, 3).flatten(2)
    h = model.config.gru_hidden
    for rnn in model.rnns:
        out, _ = rnn.gru(rnn.norm(x))
        x = out[..., :h] + out[..., h:]
    return model.head(x).log_softmax(-1)[0]


@pytest.mark.parametrize("kernels, strides", [([[11, 21], [11, 11]], [[2, 2], [1, 2]]), ([[4, 5]], [[3, 2]])])
def test_default_model_computes_what_it_did(kernels, strides):
    torch.manual_seed(0)
    cfg = ModelConfig(FeatureConfig(n_mels=40), conv_channels=[6] * len(kernels), conv_kernels=kernels,
                      conv_strides=strides, gru_layers=2, gru_hidden=24)
    model = DeepSpeech2(cfg).eval()
    wave = torch.randn(7001)
    with torch.no_grad():
        got, frames = model(wave[None], torch.tensor([len(wave)]))
        expected = reference_bidirectional(model, wave)
    assert got.shape[1] == frames[0] == len(expected)
    assert torch.allclose(got[0], expected, atol=1e-5)


def test_model_json_without_the_new_keys_loads(tmp_path):
    torch.manual_seed(0)
    model = DeepSpeech2(ModelConfig(FeatureConfig(n_mels=40), gru_layers=1, gru_hidden=16)).eval()
    save_model(tmp_path / "m", model, asr.Vocabulary())
    meta_file = tmp_path / "m" / "model.json"
    meta = json.loads(meta_file.read_text())
    assert meta["config"].pop("bidirectional") is True and meta["config"].pop("lookahead_frames") == 0
    meta_file.write_text(json.dumps(meta))  # as an earlier asr wrote it
    loaded, _, _ = load_model_files(tmp_path / "m")
    assert loaded.config == model.config
    wave = torch.randn(1, 5000)
    with torch.no_grad():
        assert torch.equal(loaded(wave, torch.tensor([5000]))[0], model(wave, torch.tensor([5000]))[0])


# ---------------------------------------------------------------- causality: the documented right context


@pytest.mark.parametrize("kernels, strides, lookahead, future", CAUSAL_CASES)
def test_output_frames_see_exactly_the_documented_feature_frames(kernels, strides, lookahead, future):
    """Changing feature frames from j on changes output frame t exactly when t * stride + future >= j."""
    model = one_way(kernels, strides, lookahead)
    assert model.config.future_feature_frames == future
    stride = model.config.time_stride
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 40, 150, generator=gen)
    frames = torch.tensor([150])
    with torch.no_grad():
        before = network(model, feats, frames)[0]
        for j in (1, 37, 80, 149):
            changed = feats.clone()
            changed[..., j:] = torch.randn(1, 40, 150 - j, generator=gen)
            difference = (network(model, changed, frames)[0] - before).abs().amax(-1)
            first = max(0, -(-(j - future) // stride))  # the first output frame allowed to depend on frame j
            assert (difference[:first] < 1e-5).all(), f"an output frame before {first} sees frame {j}"
            if first < len(difference):
                assert difference[first] > 1e-4, f"output frame {first} should see feature frame {j}"


@pytest.mark.parametrize("kernels, strides, lookahead, future", CAUSAL_CASES[:2])
def test_changing_audio_changes_no_frame_before_the_lookahead(kernels, strides, lookahead, future):
    """The whole forward pass from waveforms: output frame t depends on no sample from
    t * time_stride * hop + future_samples on (with global normalisation, as a streaming model runs)."""
    model = one_way(kernels, strides, lookahead, normalization="global", win_ms=20.0, n_fft=400)  # window < n_fft
    model.features.set_global_stats(torch.linspace(-3, 1, 40), torch.linspace(1, 2, 40))
    cfg = model.config
    samples_per_frame = cfg.time_stride * cfg.features.hop_length
    gen = torch.Generator().manual_seed(2)
    wave = 0.1 * torch.randn(1, 24_000, generator=gen)
    lengths = torch.tensor([24_000])
    with torch.no_grad():
        before, frames = model(wave, lengths)
        assert torch.equal(frames, model.output_lengths(lengths)) and before.shape[1] == frames[0]
        for s in (700, 9_001, 20_000):
            changed = wave.clone()
            changed[:, s:] = 0.1 * torch.randn(1, 24_000 - s, generator=gen)
            difference = (model(changed, lengths)[0] - before)[0].abs().amax(-1)
            unchanged = max(0, (s - cfg.future_samples) // samples_per_frame + 1)  # frames 0 .. unchanged - 1
            assert (difference[:unchanged] < 1e-5).all(), f"a frame before {unchanged} sees sample {s}"
            assert difference[unchanged:].max() > 1e-3


def test_padding_never_leaks_into_a_unidirectional_model():
    model = one_way([[11, 21], [11, 11]], [[2, 2], [1, 2]], 3)
    waves, lengths = noise_batch([5_000, 16_000, 9_999], seed=3)
    with torch.no_grad():
        batch, frames = model(waves, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone, alone_frames = model(waves[i: i + 1, :n], lengths[i: i + 1])
            assert frames[i] == alone_frames[0] == alone.shape[1]
            assert torch.allclose(batch[i, : frames[i]], alone[0], atol=1e-5)


def test_end_silence_is_zeros_after_each_input_whatever_the_padding_held():
    model = one_way([[11, 21], [11, 11]], [[2, 2], [1, 2]], 2, end_silence_ms=300)
    plain = one_way([[11, 21], [11, 11]], [[2, 2], [1, 2]], 2)  # the same weights (seed), no end silence
    assert model.config.end_silence_samples == 4800
    waves, lengths = noise_batch([5_000, 16_000, 9_999], seed=3)
    waves = waves + 0.5 * (torch.arange(waves.shape[1])[None] >= lengths[:, None])  # garbage past each end
    with torch.no_grad():
        got, frames = model(waves, lengths)
        assert torch.equal(frames, model.output_lengths(lengths))
        for i, n in enumerate(lengths.tolist()):
            silence = torch.cat([waves[i, :n], torch.zeros(4800)])[None]
            expected, expected_frames = plain(silence, torch.tensor([n + 4800]))
            assert frames[i] == expected_frames[0] > plain.output_lengths(lengths[i: i + 1])[0]
            assert torch.allclose(got[i, : frames[i]], expected[0], atol=1e-5)


# ---------------------------------------------------------------- sizes and validation


@pytest.mark.parametrize("bidirectional, lookahead, normalization, pieces", [
    (True, 0, "per_utterance", 0), (False, 0, "global", 0), (False, 3, "none", 0), (False, 16, "global", 0),
    (True, 0, "per_utterance", 57)])
def test_parameter_count_is_computed_right(bidirectional, lookahead, normalization, pieces):
    cfg = ModelConfig(FeatureConfig(n_mels=40, normalization=normalization), conv_channels=[4, 6],
                      conv_kernels=[[5, 11], [4, 5]], conv_strides=[[2, 2], [1, 3]], gru_layers=2, gru_hidden=20,
                      vocab_size=31, bidirectional=bidirectional, lookahead_frames=lookahead,
                      word_piece_vocab_size=pieces)
    model = DeepSpeech2(cfg)
    assert cfg._parameter_count() == sum(p.numel() for p in model.parameters()) == model.num_parameters()
    assert sum(p.numel() for p in model.lookahead.parameters()) == (20 * (lookahead + 1) if lookahead else 0)
    assert model.rnns[0].gru.bidirectional == bidirectional


@pytest.mark.parametrize("override, message", [
    (["model.bidirectional=false"], r"model\.features\.normalization: a unidirectional model .* got 'per_utterance'"),
    (["model.bidirectional=false", "model.features.normalization=per_utterance_level"],
     r"model\.features\.normalization: .*global or none"),
    (["model.lookahead_frames=2"], r"model\.lookahead_frames: only a unidirectional model"),
    (["model.bidirectional=false", "model.features.normalization=global", "model.lookahead_frames=17"],
     r"model\.lookahead_frames: must be an integer >= 0 and <= 16, got 17"),
    (["model.lookahead_frames=-1"], r"model\.lookahead_frames: must be an integer"),
    (["model.bidirectional=maybe"], r"model\.bidirectional: expected bool"),
    (["model.end_silence_ms=-10"], r"model\.end_silence_ms: must be .*>= 0 and <= 5000, got -10"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_bad_model_json_values_name_the_key(tmp_path):
    torch.manual_seed(0)
    model = one_way([[5, 11]], [[2, 2]], 1)
    save_model(tmp_path / "m", model, asr.Vocabulary())
    assert read_model_json(tmp_path / "m")[0] == model.config
    meta_file = tmp_path / "m" / "model.json"
    meta = json.loads(meta_file.read_text())
    for key, value, message in [("bidirectional", "no", r"config\.bidirectional: must be true or false"),
                                ("lookahead_frames", 2.5, r"config\.lookahead_frames: must be an integer"),
                                ("features", {**meta["config"]["features"], "normalization": "per_utterance"},
                                 r"config\.features\.normalization: a unidirectional model")]:
        meta_file.write_text(json.dumps({**meta, "config": {**meta["config"], key: value}}))
        with pytest.raises(CheckpointError, match=f"{meta_file}: invalid model description: {message}"):
            read_model_json(tmp_path / "m")


def test_streaming_recipes_are_unidirectional_and_as_big_as_the_cpu_ones():
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for corpus in ("fsdd", "english"):
        streaming = load_config(recipes / corpus / "streaming.yaml").model
        cpu = load_config(recipes / corpus / "cpu.yaml").model
        assert not streaming.bidirectional and streaming.lookahead_frames > 0
        assert streaming.features.normalization == "running_level" and streaming.end_silence_ms > 0
        assert (streaming.conv_channels, streaming.gru_layers, streaming.gru_hidden) == (
            cpu.conv_channels, cpu.gru_layers, cpu.gru_hidden)


# ---------------------------------------------------------------- training, transcription, ONNX


def test_tiny_unidirectional_model_trains_and_transcribes(tone_corpus, tmp_path):
    config = load_config(None, TINY_OVERRIDES + [
        "model.bidirectional=false", "model.lookahead_frames=2", "model.features.normalization=global",
        "model.end_silence_ms=200", "data.gain_db=[-20,0]", "train.epochs=3", "train.max_steps=4",
        "train.eval_every_steps=2"])
    result = Trainer(config, tone_corpus, tone_corpus, tmp_path / "exp", progress=False).fit()
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "exp" / "train_log.csv"))]
    assert losses and all(loss == loss and loss < 1e4 for loss in losses)
    model = asr.load_model(result.best_dir, device="cpu", backend="torch")
    assert not model.model.config.bidirectional and model.model.config.lookahead_frames == 2
    assert model.model.features.mean.abs().sum() > 0  # the training-set statistics came along
    audio = [tone_speech(t, seed=i) for i, t in enumerate(TEXTS[:3])]
    results = model.transcribe(audio, sample_rate=16_000)
    assert len(results) == 3 and all(isinstance(r.text, str) and r.duration > 0 for r in results)
    assert all(w.end <= r.duration for r in results for w in r.words)  # none in the end silence


def test_onnx_export_of_a_unidirectional_model_matches_torch(tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'asr[onnx]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (a dependency: pip install -e .)")
    from asr.serve.onnx_export import ONNX_FILE, OnnxNetwork, export_onnx

    model = one_way([[5, 11], [3, 5]], [[2, 2], [1, 2]], 2, end_silence_ms=100)
    with torch.no_grad():
        model.head[1].weight.mul_(20)  # decisive greedy paths
    save_model(tmp_path / "m", model, asr.Vocabulary())
    export_onnx(tmp_path / "m")
    model, _, _ = load_model_files(tmp_path / "m")
    waves, lengths = noise_batch([16_007, 4001, 23_456, 1601], seed=0)
    with torch.no_grad():
        feats, frames = model.input_features(waves, lengths)
        got, got_frames = OnnxNetwork(tmp_path / "m" / ONNX_FILE)(feats, frames)
        assert torch.equal(got_frames, model.output_lengths(lengths))
        for i, n in enumerate(lengths.tolist()):
            alone = model(waves[i: i + 1, :n], lengths[i: i + 1])[0][0]
            assert torch.allclose(got[i, : len(alone)], alone, atol=1e-4), f"item {i}"
    audio = [tone_speech(t, seed=i) for i, t in enumerate(TEXTS)]
    onnx_model = asr.load_model(tmp_path / "m", device="cpu")
    torch_model = asr.load_model(tmp_path / "m", device="cpu", backend="torch", precision="fp32")  # as onnx
    assert onnx_model.backend == "onnx"
    options = dict(sample_rate=16_000, batch_size=3)
    assert [r.text for r in onnx_model.transcribe(audio, **options)] == [
        r.text for r in torch_model.transcribe(audio, **options)]
