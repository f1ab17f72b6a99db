import copy
import csv
import json
import time

import pytest
import torch
from safetensors.torch import load_file

import asr
from asr.checkpoint import load_trainer_state
from asr.config import ConfigError, load_config
from asr.manifest import ManifestError
from asr.train.trainer import Trainer

from .conftest import TEXTS, TINY_OVERRIDES, after_step, manifest_text_with_absolute_paths


def test_tiny_model_overfits_to_zero_error(trained_tiny_model, tone_corpus):
    model = asr.load_model(trained_tiny_model)
    folder = tone_corpus.parent
    results = model.transcribe([str(folder / f"utt{i}.wav") for i in range(len(TEXTS))])
    assert [r.text for r in results] == TEXTS
    exp = trained_tiny_model.parent
    rows = list(csv.DictReader(open(exp / "eval_log.csv")))
    assert float(rows[-1]["dev_wer"]) == 0.0 and float(rows[0]["dev_wer"]) > 0.5
    assert (exp / "train_log.csv").exists() and any((exp / "tensorboard").iterdir())
    assert json.loads((exp / "best" / "model.json").read_text())["metadata"]["best_dev_wer"] == 0.0


class Crash(Exception):
    pass


def _crash() -> None:
    raise Crash()


def _run(corpus, out, crash_at=None, **kw):
    overrides = TINY_OVERRIDES + ["train.epochs=4", "data.max_batch_seconds=1", "train.checkpoint_every_steps=3",
                                  "train.eval_every_steps=100", "model.dropout=0.2", "model.features.time_masks=1"]
    config = load_config(None, overrides + [f"{k}={v}" for k, v in kw.items()])
    trainer = Trainer(config, corpus, corpus, out, progress=False)
    if crash_at is not None:
        after_step(trainer, crash_at, _crash)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_interrupted_run_resumes_to_the_same_weights(tone_corpus, tmp_path, ema_decay):
    straight = _run(tone_corpus, tmp_path / "straight", **{"train.ema_decay": ema_decay})
    straight.fit()
    steps = straight.step
    assert steps > 8
    crashed = _run(tone_corpus, tmp_path / "crashed", crash_at=8, **{"train.ema_decay": ema_decay})
    with pytest.raises(Crash):
        crashed.fit()
    assert crashed.latest_checkpoint().name == "step-00000006"
    assert 0 < load_trainer_state(crashed.latest_checkpoint())["batch_in_epoch"]  # mid-epoch: sampler position
    resumed = _run(tone_corpus, tmp_path / "crashed", **{"train.ema_decay": ema_decay})
    resumed.fit()
    assert resumed.step == steps
    for name in ("checkpoints/" + straight.latest_checkpoint().name, "best"):  # best: the average, if any
        a = load_file(str(tmp_path / "straight" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "crashed" / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), (name, k)
    last = load_file(str(straight.latest_checkpoint() / "model.safetensors"))
    best = load_file(str(tmp_path / "straight" / "best" / "model.safetensors"))
    averaged = not all(torch.equal(last[k], best[k]) for k in last)
    assert averaged == bool(ema_decay)  # with a moving average, best/ holds it rather than the last weights
    assert (tmp_path / "crashed" / "best" / "model.safetensors").exists()
    assert len(list((tmp_path / "crashed" / "checkpoints").iterdir())) == 2  # keep_checkpoints


def test_global_normalisation_statistics_are_stored(tone_corpus, tmp_path):
    trainer = _run(tone_corpus, tmp_path / "g", **{"model.features.normalization": "global", "train.max_steps": 2})
    trainer.fit()
    meta = json.loads((tmp_path / "g" / "best" / "model.json").read_text())
    mean = torch.tensor(meta["normalization"]["mean"])
    assert mean.shape == (40,) and mean.abs().sum() > 0 and min(meta["normalization"]["std"]) > 0


def test_bad_audio_in_training_manifest_names_the_file(tone_corpus, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    manifest = tmp_path / "m.jsonl"
    text = manifest_text_with_absolute_paths(tone_corpus)
    manifest.write_text(text.replace(f"{tone_corpus.parent}/utt1.wav", str(bad)))
    with pytest.raises(ManifestError, match=r"line 2: \S*broken\.wav"):
        _run(manifest, tmp_path / "out").fit()


def test_restart_discards_the_old_run(tone_corpus, tmp_path):
    _run(tone_corpus, tmp_path / "r", **{"train.max_steps": 6}).fit()
    again = _run(tone_corpus, tmp_path / "r", **{"train.max_steps": 3})
    again.fit(resume=False)
    assert again.step == 3 and again.latest_checkpoint().name == "step-00000003"
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "r" / "eval_log.csv"))] == ["3"]


def test_eval_log_counts_the_epochs_finished_the_last_included(tone_corpus, tmp_path):
    trainer = _run(tone_corpus, tmp_path / "r", **{"train.epochs": 3, "train.eval_every_steps": 0})
    trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "r" / "eval_log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # the last, at the end of epoch 3, once said 2
    assert rows[-1]["step"] == str(trainer.step)


def test_init_from_starts_at_the_given_weights_and_refuses_another_architecture(trained_tiny_model, tone_corpus,
                                                                              tmp_path):
    from asr.checkpoint import CheckpointError

    source = load_file(trained_tiny_model / "model.safetensors")
    config = load_config(None, TINY_OVERRIDES + [f"train.init_from={trained_tiny_model}", "train.lr=0",
                                                 "train.max_steps=1", "model.dropout=0.3",
                                                 "model.features.vtlp_warp=[0.9,1.1]"])
    result = Trainer(config, tone_corpus, tone_corpus, tmp_path / "ft", progress=False).fit()
    tuned = load_file(result.best_dir / "model.safetensors")
    # BatchNorm statistics move with the one step in train mode; the weights must not (augmentation settings such
    # as dropout and vtlp_warp may differ from the source's)
    statistics = ("num_batches_tracked", "running_mean", "running_var")
    assert all(torch.equal(source[k], tuned[k]) for k in source if not k.endswith(statistics))
    assert result.best_wer == 0.0  # the trained model's accuracy carries over
    config = load_config(None, TINY_OVERRIDES + [f"train.init_from={trained_tiny_model}", "model.gru_hidden=24"])
    with pytest.raises(CheckpointError, match="gru_hidden"):
        Trainer(config, tone_corpus, tone_corpus, tmp_path / "bad", progress=False).fit()


def test_a_one_way_model_starts_from_a_bidirectional_ones_forward_direction(trained_tiny_model, tone_corpus,
                                                                           tmp_path):
    from asr.checkpoint import CheckpointError

    source = load_file(trained_tiny_model / "model.safetensors")
    one_way = ["model.bidirectional=false", "model.lookahead_frames=2", "model.features.normalization=running_level",
               "model.end_silence_ms=100"]
    config = load_config(None, TINY_OVERRIDES + one_way + [f"train.init_from={trained_tiny_model}", "train.lr=0",
                                                           "train.max_steps=1", "train.ema_decay=0.9"])
    result = Trainer(config, tone_corpus, tone_corpus, tmp_path / "ft", progress=False).fit()
    tuned = load_file(result.best_dir / "model.safetensors")
    statistics = ("num_batches_tracked", "running_mean", "running_var")
    copied = [k for k in source if not k.endswith(statistics + ("_reverse",)) and not k.startswith("features.")]
    assert "rnns.0.gru.weight_hh_l0" in copied and "rnns.0.gru.weight_hh_l0_reverse" not in tuned
    assert all(torch.equal(source[k], tuned[k]) for k in copied)
    assert tuned["features.mean"].abs().sum() > 0  # its own global statistics (the source had per-utterance ones)
    config = load_config(None, TINY_OVERRIDES + one_way + [f"train.init_from={trained_tiny_model}",
                                                           "model.gru_hidden=24"])
    with pytest.raises(CheckpointError, match="gru_hidden"):
        Trainer(config, tone_corpus, tone_corpus, tmp_path / "bad", progress=False).fit()


def test_a_wider_model_starts_from_a_narrower_ones_units(trained_tiny_model, tone_corpus, tmp_path):
    """train.init_from into gru_hidden twice the source's: the units are copied (Net2Net), so the accuracy carries
    over; a width that is no multiple of the source's is refused."""
    from asr.checkpoint import CheckpointError

    config = load_config(None, TINY_OVERRIDES + [f"train.init_from={trained_tiny_model}", "model.gru_hidden=192",
                                                 "train.lr=0", "train.max_steps=1", "train.ema_decay=0.9"])
    trainer = Trainer(config, tone_corpus, tone_corpus, tmp_path / "wide", progress=False)
    result = trainer.fit()
    wide = load_file(result.best_dir / "model.safetensors")
    assert wide["rnns.0.gru.weight_hh_l0"].shape == (3 * 192, 192)
    assert result.best_wer == 0.0  # the trained model's accuracy carries over
    config = load_config(None, TINY_OVERRIDES + [f"train.init_from={trained_tiny_model}", "model.gru_hidden=144"])
    with pytest.raises(CheckpointError, match="gru_hidden"):
        Trainer(config, tone_corpus, tone_corpus, tmp_path / "bad", progress=False).fit()


def test_a_model_with_another_time_stride_starts_from_the_same_weights(trained_tiny_model, tone_corpus, tmp_path):
    """train.init_from into conv strides that differ in time alone: every weight keeps its shape and is copied, and
    the model runs at the new frame rate; a frequency stride that differs changes the GRU's input and is refused."""
    from asr.checkpoint import CheckpointError

    source = load_file(trained_tiny_model / "model.safetensors")
    config = load_config(None, TINY_OVERRIDES + [f"train.init_from={trained_tiny_model}", "model.conv_strides=[[3,2]]",
                                                 "train.lr=0", "train.max_steps=1"])
    result = Trainer(config, tone_corpus, tone_corpus, tmp_path / "stride3", progress=False).fit()
    tuned = load_file(result.best_dir / "model.safetensors")
    statistics = ("num_batches_tracked", "running_mean", "running_var")
    assert all(torch.equal(source[k], tuned[k]) for k in source if not k.endswith(statistics))
    assert asr.load_model(result.best_dir, backend="torch").model.config.time_stride == 3
    config = load_config(None, TINY_OVERRIDES + [f"train.init_from={trained_tiny_model}", "model.conv_strides=[[2,1]]"])
    with pytest.raises(CheckpointError, match="conv_strides"):
        Trainer(config, tone_corpus, tone_corpus, tmp_path / "bad", progress=False).fit()


def test_consistency_loss_pulls_each_view_towards_the_other_over_real_frames_only():
    """CR-CTC's term: the symmetric KL of the two views, padding frames left out, each target view detached, so
    view a's gradient is that of KL(b || a) / 2 alone: -exp(b) / 2 on its real frames, 0 on padding."""
    from asr.train.consistency import consistency_loss

    torch.manual_seed(0)
    a = torch.randn(2, 5, 4).log_softmax(-1).requires_grad_()
    b = torch.randn(2, 5, 4).log_softmax(-1).requires_grad_()
    lengths = torch.tensor([5, 3])
    loss = consistency_loss(a, b, lengths)
    pa, pb = a.exp(), b.exp()
    expected = sum(0.5 * ((pb[i, :n] * (b[i, :n] - a[i, :n])).sum() + (pa[i, :n] * (a[i, :n] - b[i, :n])).sum())
                   for i, n in enumerate(lengths.tolist()))
    assert torch.allclose(loss, expected)
    assert float(consistency_loss(a, a, lengths).detach()) == 0.0
    loss.backward()
    real = torch.arange(5)[None, :, None] < lengths[:, None, None]
    assert torch.allclose(a.grad, torch.where(real, -0.5 * pb, 0.0).detach())
    assert torch.allclose(b.grad, torch.where(real, -0.5 * pa, 0.0).detach())


def test_consistency_regularised_training_is_ctc_when_both_views_are_the_same(tone_corpus, tmp_path):
    """train.consistency_weight: each utterance is seen twice. Without augmentation or dropout the two views are
    the same, the term is 0 and the steps are plain CTC's; with them, the term is logged and nonzero."""
    steps = ["train.max_steps=3", "train.eval_every_steps=100", "train.log_every_steps=1"]
    plain = Trainer(load_config(None, TINY_OVERRIDES + steps), tone_corpus, tone_corpus, tmp_path / "plain",
                    progress=False)
    plain.fit()
    twice = Trainer(load_config(None, TINY_OVERRIDES + steps + ["train.consistency_weight=0.5"]),
                    tone_corpus, tone_corpus, tmp_path / "twice", progress=False)
    twice.fit()
    for name, value in plain.model.state_dict().items():  # the same within float error (Adam amplifies it)
        assert torch.allclose(value, twice.model.state_dict()[name], atol=1e-4), name
    plain_rows = list(csv.DictReader(open(tmp_path / "plain" / "train_log.csv")))
    rows = list(csv.DictReader(open(tmp_path / "twice" / "train_log.csv")))
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in plain_rows], rel=1e-4)
    assert [float(r["consistency"]) for r in rows] == [0.0] * 3
    augmented = Trainer(load_config(None, TINY_OVERRIDES + steps + [
        "train.consistency_weight=0.5", "model.dropout=0.2", "model.features.time_masks=1",
        "model.features.freq_masks=1"]),
        tone_corpus, tone_corpus, tmp_path / "augmented", progress=False)
    augmented.fit()
    rows = list(csv.DictReader(open(tmp_path / "augmented" / "train_log.csv")))
    assert all(float(r["consistency"]) > 0 for r in rows)


def test_intermediate_ctc_on_the_last_layer_is_plain_ctc(tone_corpus, tmp_path):
    """train.intermediate_ctc_weight: (1 - w) * CTC + w * the CTC read from a middle GRU layer through the same
    head. Read from the last layer, that is the output itself: the steps are plain CTC's and both terms logged
    equal; from a lower layer, the term differs and the steps do too."""
    steps = ["train.max_steps=3", "train.eval_every_steps=100", "train.log_every_steps=1"]

    def fit(name: str, *overrides: str) -> Trainer:
        trainer = Trainer(load_config(None, TINY_OVERRIDES + steps + list(overrides)), tone_corpus, tone_corpus,
                          tmp_path / name, progress=False)
        trainer.fit()
        return trainer

    def rows(name: str) -> list[dict]:
        return list(csv.DictReader(open(tmp_path / name / "train_log.csv")))

    plain = fit("plain")
    last = fit("last", "train.intermediate_ctc_weight=0.3", "train.intermediate_ctc_layer=1")
    for name, value in plain.model.state_dict().items():
        assert torch.allclose(value, last.model.state_dict()[name], atol=1e-5), name
    assert [float(r["intermediate"]) for r in rows("last")] == [float(r["loss"]) for r in rows("last")]
    assert [float(r["loss"]) for r in rows("last")] == pytest.approx([float(r["loss"]) for r in rows("plain")],
                                                                      rel=1e-5)
    two = ["model.gru_layers=2", "train.seed=3"]
    deep = fit("deep", *two)
    middle = fit("middle", *two, "train.intermediate_ctc_weight=0.3")  # the middle of 2 layers: the first
    assert middle.intermediate_layer == 1
    assert all(float(r["intermediate"]) != float(r["loss"]) for r in rows("middle"))
    assert not torch.allclose(deep.model.rnns[0].gru.weight_ih_l0, middle.model.rnns[0].gru.weight_ih_l0)
    cr = ["train.consistency_weight=0.5", "model.dropout=0.2"]  # with CR-CTC too, the term still counts
    cr_alone, cr_middle = fit("cr", *two, *cr), fit("cr-middle", *two, *cr, "train.intermediate_ctc_weight=0.3")
    assert not torch.allclose(cr_alone.model.rnns[0].gru.weight_ih_l0, cr_middle.model.rnns[0].gru.weight_ih_l0)
    with pytest.raises(ConfigError, match="intermediate_ctc_layer.*2 GRU layers, got 3"):
        Trainer(load_config(None, TINY_OVERRIDES + two + ["train.intermediate_ctc_weight=0.3",
                                                          "train.intermediate_ctc_layer=3"]),
                tone_corpus, tone_corpus, tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="intermediate_ctc_weight: must be below 1"):
        load_config(None, ["train.intermediate_ctc_weight=1"])


def test_training_speed_leaves_out_evaluation_time(tone_corpus, tmp_path):
    """audio_sec_per_sec is training's speed: a dev evaluation between two steps (here one that takes 3 s) is not
    counted as the time of the step after it."""
    config = load_config(None, TINY_OVERRIDES + ["train.max_steps=6", "train.log_every_steps=2",
                                                 "train.eval_every_steps=2", "data.max_batch_seconds=1"])
    trainer = Trainer(config, tone_corpus, tone_corpus, tmp_path / "exp", progress=False)
    trainer._evaluate_and_checkpoint = lambda: time.sleep(3)
    trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "exp" / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 4, 6]
    hours = [0.0] + [float(r["audio_hours"]) for r in rows]
    for row, before in zip(rows, hours):  # each row's audio (about 2 s) over at least 3 s if the sleep counted
        assert float(row["audio_sec_per_sec"]) > 2 * (float(row["audio_hours"]) - before) * 3600 / 3, rows


def test_the_callers_config_is_left_unchanged(tone_corpus, tmp_path):
    config = load_config(None, TINY_OVERRIDES + ["model.vocab_size=40", "train.max_steps=1"])
    before = copy.deepcopy(config)
    trainer = Trainer(config, tone_corpus, tone_corpus, tmp_path / "o", progress=False)
    assert trainer.config.model.vocab_size == len(trainer.vocab) != 40  # the model is sized by the vocabulary
    trainer.fit()
    assert config == before


def test_each_train_log_row_is_the_mean_of_the_steps_since_the_last(tone_corpus, tmp_path):
    """A row's loss is over every utterance of the steps it covers (step 1 alone, then 2-3, 4-6), not the loss of
    the one step that happens to be logged; grad_norm is their mean."""
    config = load_config(None, TINY_OVERRIDES + ["train.max_steps=7", "train.log_every_steps=3",
                                                 "train.eval_every_steps=100", "data.max_batch_seconds=1"])
    trainer = Trainer(config, tone_corpus, tone_corpus, tmp_path / "exp", progress=False)
    steps = []
    train_step = trainer.train_step

    def recorded(batches):
        metrics = train_step(batches)
        steps.append((metrics["loss"], metrics["grad_norm"], sum(len(b["ids"]) for b in batches)))
        return metrics
    trainer.train_step = recorded
    trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "exp" / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 3, 6]
    for row, (first, last) in zip(rows, [(0, 1), (1, 3), (3, 6)]):
        covered = steps[first:last]
        utterances = sum(n for _, _, n in covered)
        assert float(row["loss"]) == pytest.approx(sum(loss * n for loss, _, n in covered) / utterances, abs=1e-3)
        assert float(row["grad_norm"]) == pytest.approx(sum(g for _, g, _ in covered) / len(covered), abs=1e-2)
    assert len({n for _, _, n in steps}) > 1 and len({loss for loss, _, _ in steps}) == len(steps)
