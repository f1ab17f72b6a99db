import math

import pytest
import torch

from asr.features import FeatureConfig
from asr.model import DeepSpeech2, ModelConfig

SMALL = dict(gru_layers=2, gru_hidden=64)


ONE_WAY = dict(bidirectional=False, lookahead_frames=2, features=FeatureConfig(normalization="global"))


@pytest.mark.parametrize("one_way", [False, True])
@pytest.mark.parametrize("strides", [[[2, 2], [1, 2]], [[2, 2], [2, 1]], [[1, 2]]])
def test_output_lengths_for_odd_inputs(strides, one_way):
    n = len(strides)
    cfg = ModelConfig(conv_channels=[8] * n, conv_kernels=[[11, 41], [11, 21]][:n], conv_strides=strides, **SMALL,
                      **(ONE_WAY if one_way else {}))
    model = DeepSpeech2(cfg).eval()
    lengths = torch.tensor([16001, 3203, 1601, 4799])
    waves = torch.randn(4, 16001)
    log_probs, out_lengths = model(waves, lengths)
    assert torch.equal(out_lengths, model.output_lengths(lengths))
    assert log_probs.shape == (4, int(out_lengths.max()), cfg.vocab_size)
    frames = lengths // 160 + 1
    assert torch.all(out_lengths == -(-frames // cfg.time_stride))  # ceil(frames / stride)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(()), atol=1e-4)


def test_padding_never_leaks():
    """An utterance gives the same posteriors alone and beside a longer one in a padded batch."""
    torch.manual_seed(0)
    model = DeepSpeech2(ModelConfig(**SMALL)).eval()
    short, long = torch.randn(5000), torch.randn(16000)
    batch = torch.zeros(2, 16000)
    batch[0, :5000], batch[1] = short, long
    lp_batch, lens = model(batch, torch.tensor([5000, 16000]))
    lp_alone, lens_alone = model(short[None], torch.tensor([5000]))
    assert lens[0] == lens_alone[0]
    assert torch.allclose(lp_batch[0, : lens[0]], lp_alone[0], atol=1e-5)


def test_an_utterance_alone_runs_its_grus_unpacked(monkeypatch):
    """Nothing is padded in a batch of one: its GRUs run without packing (faster, and the same posteriors, as
    test_padding_never_leaks checks); a padded batch still packs."""
    import asr.model

    packed = []
    real = asr.model.pack_padded_sequence
    monkeypatch.setattr(asr.model, "pack_padded_sequence", lambda *a, **k: packed.append(1) or real(*a, **k))
    model = DeepSpeech2(ModelConfig(**SMALL)).eval()
    model(torch.randn(1, 8000), torch.tensor([8000]))
    assert packed == []
    model(torch.randn(2, 8000), torch.tensor([8000, 5000]))
    assert len(packed) == SMALL["gru_layers"]


def test_parameter_count_and_config_validation():
    model = DeepSpeech2(ModelConfig(**SMALL))
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 100_000
    with pytest.raises(ValueError, match="one entry per conv layer"):
        ModelConfig(conv_channels=[8, 8], conv_kernels=[[3, 3]], conv_strides=[[1, 1]])


def test_spec_augment_only_in_training():
    torch.manual_seed(0)
    model = DeepSpeech2(ModelConfig(**SMALL))
    feats = torch.randn(2, 80, 100)
    frames = torch.tensor([100, 60])
    model.spec_augment.train()
    masked = model.spec_augment(feats.clone(), frames)
    assert (masked == 0).any() and not torch.equal(masked, feats)
    model.spec_augment.eval()
    assert torch.equal(model.spec_augment(feats, frames), feats)


@pytest.mark.parametrize("normalization, keeps_band_shape", [("per_utterance", False), ("per_utterance_level", True)])
def test_utterance_normalisation_removes_gain(normalization, keeps_band_shape):
    from asr.features import FeatureConfig, LogMel

    torch.manual_seed(0)
    t = torch.arange(8000) / 16000
    wave = (torch.sin(2 * torch.pi * 300 * t) + 0.01 * torch.randn(8000))[None]  # energy in the low bands only
    feats = LogMel(FeatureConfig(n_mels=40, normalization=normalization))
    lengths = torch.tensor([8000])
    quiet, _ = feats(0.1 * wave, lengths)
    loud, _ = feats(wave, lengths)
    assert torch.allclose(quiet, loud, atol=0.05)  # a gain change is a constant in the log domain
    band_means = loud[0].mean(-1)
    assert (band_means[:8].mean() - band_means[-8:].mean() > 1.0) == keeps_band_shape


def test_running_level_removes_gain_as_its_estimate_fills_in():
    """running_level: a gain is a constant c in the log domain; frame t keeps c * prior / (prior + frames so far)
    of it (its level estimate starts at the training set's level), and frames never see later ones."""
    from asr.features import FeatureConfig, LogMel

    torch.manual_seed(0)
    t = torch.arange(32000) / 16000
    wave = (torch.sin(2 * torch.pi * 300 * t) + 0.01 * torch.randn(32000))[None]
    cfg = FeatureConfig(n_mels=40, normalization="running_level", level_window_ms=1000.0, level_prior_ms=200.0)
    feats = LogMel(cfg)
    feats.set_global_stats(torch.full((40,), -4.0), torch.full((40,), 2.0))
    lengths = torch.tensor([32000])
    quiet, _ = feats(0.1 * wave, lengths)
    loud, _ = feats(wave, lengths)
    c = 2 * math.log(10) / 2.0  # 20 dB of power in natural log, over the global std
    frames = torch.arange(1, loud.shape[-1] + 1).clamp_max(100).double()
    left = (loud - quiet)[0].mean(0).double()  # the sine's harmonics dominate: log(mel + 1e-6) ~ log(mel)
    assert torch.allclose(left[1:-2], (c * 20 / (20 + frames))[1:-2], atol=0.02)
    assert float(left[-3]) < 0.25 * c  # a second in: most of the gain is gone
    cut, _ = feats(wave[:, :16000], torch.tensor([16000]))
    assert torch.allclose(cut[0, :, :95], loud[0, :, :95], atol=1e-5)  # causal (the last frames' windows differ)


def _sine_peak_band(features, hz: float, warp: float | None = None) -> int:
    wave = torch.sin(2 * torch.pi * hz * torch.arange(16000) / 16000)[None]
    feats, _ = features.raw(wave, torch.tensor([16000]), None if warp is None else torch.tensor([warp]))
    return int(feats[0].mean(1).argmax())


def test_vocal_tract_length_perturbation_scales_frequencies():
    """A warp factor moves a tone's energy to the mel band of the tone at the scaled frequency (below the
    boundary), and a factor of 1 changes nothing."""
    from asr.features import LogMel

    features = LogMel(FeatureConfig(n_mels=64, normalization="none"))
    assert _sine_peak_band(features, 1500, 1.2) == _sine_peak_band(features, 1800) != _sine_peak_band(features, 1500)
    assert _sine_peak_band(features, 1500, 0.8) == _sine_peak_band(features, 1200) != _sine_peak_band(features, 1500)
    wave, lengths = torch.randn(2, 8000), torch.tensor([8000, 5000])
    plain, _ = features.raw(wave, lengths)
    unwarped, _ = features.raw(wave, lengths, torch.ones(2))
    assert torch.allclose(plain, unwarped, atol=1e-4)
    both, _ = features.raw(wave, lengths, torch.tensor([1.1, 0.9]))  # each utterance its own factor
    alone, frames = features.raw(wave[1:], lengths[1:], torch.tensor([0.9]))
    assert torch.allclose(both[1:, :, : int(frames)], alone, atol=1e-4)
    assert not torch.allclose(both[1:, :, : int(frames)], plain[1:, :, : int(frames)], atol=1e-2)


def test_intermediate_log_probs_come_from_the_asked_gru_layer():
    """forward(..., intermediate_layer=k): a third output, the shared head on GRU layer k's output; on the last
    layer that is the output itself (a bidirectional model has no lookahead)."""
    torch.manual_seed(0)
    model = DeepSpeech2(ModelConfig(**SMALL, dropout=0.0)).eval()
    wave, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    log_probs, frames = model(wave, lengths)
    last = model(wave, lengths, intermediate_layer=2)
    assert torch.equal(last[0], log_probs) and torch.equal(last[1], frames) and torch.allclose(last[2], log_probs)
    first = model(wave, lengths, intermediate_layer=1)[2]
    assert first.shape == log_probs.shape and not torch.allclose(first, log_probs, atol=1e-3)
    feats, feature_frames = model.input_features(wave, lengths)
    x, out_lengths = model.conv(feats.transpose(1, 2), feature_frames)
    assert torch.allclose(first, model.head(model.rnns[0](x, out_lengths)).log_softmax(-1))
    with pytest.raises(ValueError, match="intermediate_layer: a GRU layer from 1 to 2"):
        model(wave, lengths, intermediate_layer=3)


def test_vocal_tract_length_perturbation_only_in_training():
    torch.manual_seed(0)
    features = FeatureConfig(vtlp_warp=[0.9, 1.1], freq_masks=0, time_masks=0)
    model = DeepSpeech2(ModelConfig(**SMALL, dropout=0.0, features=features))
    plain = DeepSpeech2(ModelConfig(**SMALL, dropout=0.0, features=FeatureConfig(freq_masks=0, time_masks=0)))
    plain.load_state_dict(model.state_dict())
    wave, lengths = torch.randn(1, 8000), torch.tensor([8000])
    model.eval(), plain.eval()
    assert torch.equal(model(wave, lengths)[0], plain(wave, lengths)[0])
    model.train(), plain.train()
    assert not torch.allclose(model(wave, lengths)[0], plain(wave, lengths)[0], atol=1e-3)
    for bad in ([1.1, 0.9], [0.9], [0.2, 1.0]):
        with pytest.raises(ValueError, match="vtlp_warp"):
            FeatureConfig(vtlp_warp=bad)


def test_a_warp_given_applies_in_evaluation_too():
    """forward(..., warps=...): those factors, also in eval mode (a test-time warp, bench/test_time_views.py)."""
    torch.manual_seed(0)
    model = DeepSpeech2(ModelConfig(**SMALL, dropout=0.0)).eval()
    wave, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    warped = model(wave, lengths, warps=torch.tensor([0.9, 1.0]))[0]
    features, frames = model.input_features(wave, lengths, torch.tensor([0.9, 1.0]))
    x, out_lengths = model.conv(features.transpose(1, 2), frames)
    for rnn in model.rnns:
        x = rnn(x, out_lengths)
    assert torch.allclose(warped, model.head(x).log_softmax(-1), atol=1e-5)
    plain = model(wave, lengths)[0]
    assert not torch.allclose(warped[0], plain[0], atol=1e-3) and torch.allclose(warped[1], plain[1], atol=1e-4)


@pytest.mark.parametrize("one_way, pieces", [(False, 0), (True, 0), (False, 40)])
def test_a_widened_model_computes_what_its_source_does(one_way, pieces):
    """Net2Net widening: k copies of every GRU unit, read at 1/k each, give the source's outputs (both output layers'
    of a model with word pieces); noise sets them apart; a width that is no multiple of the source's is refused."""
    torch.manual_seed(0)
    extra = {**(ONE_WAY if one_way else {}), "word_piece_vocab_size": pieces}
    source = DeepSpeech2(ModelConfig(gru_layers=3, gru_hidden=32, **extra))
    with torch.no_grad():  # a lookahead and LayerNorms that are not their initial identity, BatchNorm statistics
        for name, p in source.named_parameters():
            if name.startswith(("lookahead.", "head.0.", "piece_head.0.")) or ".norm." in name:
                p.add_(0.3 * torch.randn_like(p))
    source.train()
    source(torch.randn(2, 8000), torch.tensor([8000, 6000]))  # moves the BatchNorm running statistics
    source.eval()
    wide = DeepSpeech2(ModelConfig(gru_layers=3, gru_hidden=96, **extra)).eval()
    wide.load_widened(source)
    waves, lengths = torch.randn(3, 12000), torch.tensor([12000, 7000, 3000])
    with torch.no_grad():
        expected, frames = source(waves, lengths)
        got, wide_frames = wide(waves, lengths)
    assert torch.equal(frames, wide_frames) and got.shape[-1] == 29 + pieces
    assert (got - expected).abs().max() < 1e-4
    assert wide.rnns[1].gru.weight_hh_l0.shape == (3 * 96, 96)
    wide.load_widened(source, noise=0.01, seed=1)
    with torch.no_grad():
        noisy, _ = wide(waves, lengths)
    assert 1e-4 < (noisy - expected).abs().max() < 0.5
    with pytest.raises(ValueError, match="not a multiple"):
        DeepSpeech2(ModelConfig(gru_layers=3, gru_hidden=48, **extra)).load_widened(source)
