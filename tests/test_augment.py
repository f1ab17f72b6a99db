import math

import pytest
import torch

from asr.augment import (
    CODECS,
    Augmenter,
    AugmentOptions,
    babble,
    colour,
    coloured_noise,
    reencode,
    reverberate,
    room_impulse_response,
    shift_pitch,
    telephone,
)
from asr.manifest import read_manifest
from asr.text import Vocabulary
from asr.train.data import SpeechDataset

SR = 16_000


def tone(freq: float, seconds: float = 1.0, sr: int = SR) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return 0.3 * torch.sin(2 * math.pi * freq * t)


def band_power(wave: torch.Tensor, low: float, high: float, sr: int = SR) -> float:
    spectrum = torch.fft.rfft(wave).abs() ** 2
    freqs = torch.fft.rfftfreq(len(wave), 1 / sr)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def test_noise_augmentation_hits_the_asked_snr(tone_corpus):
    utts = read_manifest(tone_corpus)[:1]
    clean = SpeechDataset(utts, Vocabulary())[0][0]
    noisy = SpeechDataset(utts, Vocabulary(), AugmentOptions(noise_snr_db=[10, 10], noise_prob=1.0))[0][0]
    noise = noisy - clean
    snr = 10 * torch.log10(clean.pow(2).mean() / noise.pow(2).mean())
    assert abs(float(snr) - 10) < 0.1


@pytest.mark.parametrize("exponent, low_over_high", [(-1, 10), (0, 1), (1, 0.1)])
def test_coloured_noise_slopes(exponent, low_over_high):
    torch.manual_seed(0)
    power = torch.fft.rfft(coloured_noise(32000, exponent)).abs() ** 2
    ratio = float(power[100:1000].mean() / power[-8000:].mean())
    assert low_over_high / 4 < ratio < low_over_high * 4


@pytest.mark.parametrize("bad", [dict(noise_snr_db=[10]), dict(reverb_rt60=[0.8, 0.2]), dict(codec_prob=1.5),
                                 dict(babble_talkers=[1, 2, 3]), dict(gain_db=[6, -30]), dict(gain_db=[-10]),
                                 dict(lead_silence_ms=[-5, 100]), dict(lead_silence_ms=[300, 100]),
                                 dict(pitch_semitones=[4, -2]), dict(pitch_semitones=[-20, 2]), dict(pitch_prob=2.0)])
def test_options_are_checked(bad):
    with pytest.raises(ValueError):
        AugmentOptions(**bad)


def test_gain_sets_the_level_within_the_asked_range():
    augment = Augmenter(AugmentOptions(gain_db=[-30, -10]), SR)
    assert augment.options.active
    wave = tone(300)
    gains = [20 * math.log10(float(augment(wave, torch.Generator().manual_seed(s)).abs().max()) / 0.3)
             for s in range(40)]
    assert -30 <= min(gains) < -25 and -15 < max(gains) <= -10  # drawn over the whole range
    loud = Augmenter(AugmentOptions(gain_db=[20, 20]), SR)(wave)
    assert 0.98 < float(loud.abs().max()) <= 1.0  # too loud: scaled back under full scale, never clipped


def test_lead_silence_comes_before_the_speech_within_the_asked_range():
    augment = Augmenter(AugmentOptions(lead_silence_ms=[100, 500]), SR)
    assert augment.options.active
    wave = tone(300, 0.5)
    leads = []
    for s in range(30):
        out = augment(wave, torch.Generator().manual_seed(s))
        lead = len(out) - len(wave)
        assert torch.equal(out[lead:], wave) and not out[:lead].any()
        leads.append(lead / SR)
    assert 0.1 <= min(leads) < 0.15 and 0.45 < max(leads) <= 0.5


def test_reverb_tail_decays_at_the_asked_rate():
    g = torch.Generator().manual_seed(0)
    rir = room_impulse_response(0.5, SR, g)
    energy = rir.pow(2)
    early, late = float(energy[SR // 20: SR // 10].mean()), float(energy[3 * SR // 20: SR // 5].mean())
    # 0.1 s further along a 60 dB / 0.5 s decay is 12 dB quieter
    assert 8 < 10 * math.log10(early / late) < 16
    click = torch.zeros(SR)
    click[1000] = 1.0
    wet = reverberate(click, rir)
    assert len(wet) == len(click)
    assert float(wet[1000 + SR // 10:].abs().sum()) > 0.1 * float(wet.abs().sum())  # energy after the click


def test_telephone_keeps_only_the_voice_band():
    wave = tone(150) + tone(1000) + tone(6000)
    narrow = telephone(wave, SR)
    assert len(narrow) == len(wave)
    kept = band_power(narrow, 900, 1100) / band_power(wave, 900, 1100)
    assert kept > 0.5
    assert band_power(narrow, 5800, 6200) < 1e-3 * band_power(wave, 5800, 6200)
    assert band_power(narrow, 100, 200) < 0.25 * band_power(wave, 100, 200)


@pytest.mark.parametrize("codec", CODECS)
def test_lossy_reencoding_keeps_length_and_content(codec):
    wave = tone(440) + 0.05 * torch.randn(SR, generator=torch.Generator().manual_seed(0))
    out = reencode(wave, SR, codec, compression=0.8)
    assert out.shape == wave.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, wave, atol=1e-4)  # it really went through the codec
    assert band_power(out, 430, 450) > 0.5 * band_power(wave, 430, 450)


def test_colouring_changes_the_spectrum_not_the_length():
    wave = coloured_noise(SR, 0.0, torch.Generator().manual_seed(1)) * 0.1
    bands = [(100, 200), (200, 600), (600, 1500), (1500, 3500), (3500, 7000)]
    spreads = []
    for seed in range(5):
        out = colour(wave, SR, 12.0, torch.Generator().manual_seed(seed))
        assert out.shape == wave.shape
        change = [10 * math.log10(band_power(out, *b) / band_power(wave, *b)) for b in bands]
        spreads.append(max(change) - min(change))
    assert sum(s > 3 for s in spreads) >= 3  # a different tilt each time, not a plain gain


def test_babble_mixes_other_talkers_at_the_asked_snr():
    talkers = [tone(300, 0.4), tone(500, 1.3)]
    mixed = babble(talkers, SR)
    assert len(mixed) == SR and band_power(mixed, 290, 310) > 0 and band_power(mixed, 490, 510) > 0
    opts = AugmentOptions(babble_prob=1.0, babble_talkers=[2, 2], babble_snr_db=[5, 5])
    clean = tone(1000)
    out = Augmenter(opts, SR, babble_source=lambda: tone(300, 0.7))(clean)
    snr = 10 * math.log10(float(clean.pow(2).mean() / (out - clean).pow(2).mean()))
    assert abs(snr - 5) < 0.2


@pytest.mark.parametrize("semitones", [-3.0, 2.0, 4.0])
def test_pitch_shift_moves_a_tone_and_keeps_the_length(semitones):
    wave = tone(200, seconds=2.0)
    shifted = shift_pitch(wave, SR, semitones)
    assert len(shifted) == len(wave)
    middle = shifted[SR // 4: SR // 4 + SR]  # one second: 1 Hz bins
    assert int(torch.fft.rfft(middle).abs().argmax()) == pytest.approx(200 * 2 ** (semitones / 12), abs=3)
    # in the chain: a share pitch_prob of the utterances, by a draw within the range
    augment = Augmenter(AugmentOptions(pitch_semitones=[semitones, semitones], pitch_prob=1.0), SR)
    assert AugmentOptions(pitch_semitones=[-2, 4]).active
    assert torch.equal(augment(wave, torch.Generator().manual_seed(0)), shifted)


def test_the_whole_chain_is_deterministic_for_a_generator_and_never_clips():
    opts = AugmentOptions(speed_perturb=[0.9, 1.1], noise_snr_db=[0, 10], noise_prob=1.0, reverb_prob=1.0,
                          eq_prob=1.0, eq_gain_db=20.0, telephone_prob=1.0, codec_prob=1.0)
    augment = Augmenter(opts, SR)
    wave = tone(300) * 3  # louder than full scale on purpose
    a = augment(wave, torch.Generator().manual_seed(7))
    b = augment(wave, torch.Generator().manual_seed(7))
    c = augment(wave, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) <= 1.0
    assert abs(len(a) - len(wave) / 0.9) < 3 or abs(len(a) - len(wave) / 1.1) < 3
    assert not AugmentOptions().active
    assert torch.equal(Augmenter(AugmentOptions(), SR)(tone(300)), tone(300))
