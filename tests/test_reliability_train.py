"""Reliability of training: full disks, bad model folders and configurations, kills and their leftovers."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr.checkpoint import CheckpointError, load_model_files, load_trainer_state, save_model
from asr.config import ConfigError, load_config
from asr.files import recover_dir, write_dir_atomically
from asr.model import DeepSpeech2, ModelConfig
from asr.text import Vocabulary
from asr.train.trainer import Trainer

from .conftest import TINY_OVERRIDES, after_step

ROOT = Path(__file__).resolve().parents[1]
RUN = ["train.checkpoint_every_steps=3", "train.eval_every_steps=2", "train.log_every_steps=1",
       "data.max_batch_seconds=1"]


class Crash(Exception):
    """Stands in for a kill at a chosen moment."""


def _trainer(corpus: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(None, TINY_OVERRIDES + RUN + list(overrides))
    return Trainer(config, corpus, corpus, out, progress=False)


def _crash() -> None:
    raise Crash()


def _tiny_model() -> DeepSpeech2:
    torch.manual_seed(0)
    return DeepSpeech2(ModelConfig(gru_layers=1, gru_hidden=16, conv_channels=[2], conv_kernels=[[3, 5]],
                                   conv_strides=[[2, 2]])).eval()


def _fill_disk(folder: Path) -> None:
    """Write a file into `folder` until its file system is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _steps(log: Path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(open(log))]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "asr.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


# ---------------------------------------------------------------- 1. a full disk during a checkpoint
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (we may be root in a container); the test is skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_during_training_keeps_the_last_checkpoint_and_best(tone_corpus, small_disk, reliability):
    out = small_disk / "exp"

    trainer = _trainer(tone_corpus, out, "train.max_steps=6", "train.eval_every_steps=3", "train.log_every_steps=100")
    # after step 3, step-00000003 and best/ are written; the next checkpoint finds no space
    after_step(trainer, 3, lambda: _fill_disk(small_disk))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*: no space left on device"):
        trainer.fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    load_model_files(out / "checkpoints" / "step-00000003")
    assert load_trainer_state(out / "checkpoints" / "step-00000003")["step"] == 3
    load_model_files(out / "best")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    reliability("disk full while writing a checkpoint", "Python", "CheckpointError 'cannot write checkpoint "
                "<dir>: no space left on device'; last checkpoint and best/ intact")


def test_disk_full_while_replacing_a_model_folder_keeps_the_old_one(small_disk, reliability):
    folder = small_disk / "m"
    save_model(folder, _tiny_model(), Vocabulary(), trainer_state={"step": 1})
    before = _files(folder)
    _fill_disk(small_disk)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {folder}: no space left on device"):
        save_model(folder, _tiny_model(), Vocabulary(), trainer_state={"step": 2})
    assert _files(folder) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "m"]
    reliability("disk full while replacing a model folder", "Python", "CheckpointError; old folder intact")


def test_no_space_from_any_write_is_a_checkpoint_error(tmp_path, monkeypatch, reliability):
    """Without a small disk: a write that fails with ENOSPC (as on a full disk) inside save_model."""
    folder = tmp_path / "m"
    save_model(folder, _tiny_model(), Vocabulary(), trainer_state={"step": 1})
    before = _files(folder)

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, "write_bytes", no_space)
    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(CheckpointError, match="no space left on device"):
        save_model(folder, _tiny_model(), Vocabulary(), trainer_state={"step": 2})
    monkeypatch.undo()
    assert _files(folder) == before and [p.name for p in tmp_path.iterdir()] == ["m"]
    reliability("write fails with ENOSPC (fake full disk)", "Python", "CheckpointError 'no space left on device'")


# ---------------------------------------------------------------- 2. model folders that cannot be trusted
def _edit_model_json(folder: Path, edit) -> None:
    meta = json.loads((folder / "model.json").read_text())
    edit(meta)
    (folder / "model.json").write_text(json.dumps(meta))


def _set(meta: dict, key: str, value) -> None:
    node = meta
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value


@pytest.mark.parametrize("key,value,message", [
    ("config.gru_hidden", 200_000, "gru_hidden"),  # 480 GB of GRU weights
    ("config.gru_hidden", 0, "gru_hidden"),
    ("config.gru_layers", -1, "gru_layers"),
    ("config.gru_hidden", "512", "gru_hidden"),
    ("config.dropout", 1.5, "dropout"),
    ("config.conv_channels", [2, 2], "conv_channels"),
    ("config.conv_kernels", [[3]], "conv_kernels"),
    ("config.conv_strides", [[0, 2]], "conv_strides"),
    ("config.features.n_mels", -5, "features.n_mels"),
    ("config.features.hop_ms", 0, "features.hop_ms"),
    ("config.features.n_fft", 10**9, "features.n_fft"),
    ("config.features.normalization", "loud", "features.normalization"),
    ("config.vocab_size", 30, "vocab_size"),
])
def test_out_of_range_model_json_values_are_refused(tmp_path, key, value, message, reliability):
    save_model(tmp_path / "m", _tiny_model(), Vocabulary())
    _edit_model_json(tmp_path / "m", lambda meta: _set(meta, key, value))
    with pytest.raises(CheckpointError, match=rf"model\.json: .*{message}"):
        load_model_files(tmp_path / "m")
    reliability(f"model.json {key}={value!r}", "Python", f"CheckpointError 'model.json: ... {message} ...'")


@pytest.mark.parametrize("case,edit", [
    ("not an object", lambda folder: (folder / "model.json").write_text("[1, 2]")),
    ("config not an object", lambda folder: _edit_model_json(folder, lambda m: m.update(config=5))),
    ("unknown config key", lambda folder: _edit_model_json(folder, lambda m: _set(m, "config.gru_size", 3))),
    ("format_version not a number", lambda folder: _edit_model_json(folder, lambda m: m.update(format_version="x"))),
    ("vocabulary without blank", lambda folder: _edit_model_json(folder, lambda m: m.update(vocabulary=["a", "b"]))),
    ("vocabulary not a list", lambda folder: _edit_model_json(folder, lambda m: m.update(vocabulary=7))),
    ("truncated json", lambda folder: (folder / "model.json").write_text('{"config": {"gru_')),
])
def test_malformed_model_json_is_a_checkpoint_error(tmp_path, case, edit, reliability):
    save_model(tmp_path / "m", _tiny_model(), Vocabulary())
    edit(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"model\.json"):
        load_model_files(tmp_path / "m")
    reliability(f"model.json: {case}", "Python", "CheckpointError naming model.json")


def test_truncated_or_mismatched_weights_are_a_checkpoint_error(tmp_path, reliability):
    folder = tmp_path / "m"
    save_model(folder, _tiny_model(), Vocabulary())
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_model_files(folder)
    (folder / "model.safetensors").write_bytes(weights)
    _edit_model_json(folder, lambda meta: _set(meta, "config.gru_hidden", 24))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*does not match"):
        load_model_files(folder)
    reliability("truncated model.safetensors", "Python", "CheckpointError 'model.safetensors: corrupt ...'")
    reliability("weights that do not match model.json", "Python", "CheckpointError '... does not match model.json'")


@pytest.mark.slow
def test_model_folder_errors_reach_the_cli_without_traceback(tmp_path, reliability):
    save_model(tmp_path / "m", _tiny_model(), Vocabulary())
    _edit_model_json(tmp_path / "m", lambda meta: _set(meta, "config.gru_hidden", 200_000))
    done = _run_cli("export", str(tmp_path / "m"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "model.json" in done.stderr and "gru_hidden" in done.stderr
    reliability("model.json asking for 480 GB", "CLI", "exit 2: '<dir>/model.json: ... gru_hidden ...'")


def test_trainer_state_with_code_does_not_run_it(tmp_path, reliability):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    save_model(tmp_path / "m", _tiny_model(), Vocabulary())
    torch.save({"optimizer": Payload()}, tmp_path / "m" / "trainer.pt")
    with pytest.raises(CheckpointError, match="trainer.pt: corrupt trainer state"):
        load_trainer_state(tmp_path / "m")
    assert not marker.exists()
    reliability("trainer.pt with a pickle that runs code", "Python", "CheckpointError; the code does not run")


# ---------------------------------------------------------------- 3. configuration values
@pytest.mark.parametrize("override,key", [
    ("train.lr=-1", "train.lr"),
    ("train.epochs=0", "train.epochs"),
    ("train.grad_clip=0", "train.grad_clip"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.precision=fp16", "train.precision"),
    ("train.ema_decay=1.5", "train.ema_decay"),
    ("data.max_batch_seconds=0", "data.max_batch_seconds"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.noise_prob=2", "data.noise_prob"),
    ("model.gru_hidden=0", "model.gru_hidden"),
    ("model.conv_strides=[[2,2],[0,2]]", "model.conv_strides"),
    ("model.features.n_mels=0", "model.features.n_mels"),
    ("model.features.win_ms=100", "model.features.win_ms"),
    ("train.lr=.nan", "train.lr"),
])
def test_out_of_range_config_values_name_the_key(override, key, reliability):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + r"\b"):
        load_config(None, [override])
    reliability(f"config {override}", "Python", f"ConfigError '{key}: ...'")


@pytest.mark.parametrize("override,unknown,suggestion", [
    ("train.lr_rate=1e-3", "train.lr_rate", "did you mean train.lr"),
    ("model.gru_hiden=3", "model.gru_hiden", "did you mean model.gru_hidden"),
    ("trian.lr=1e-3", "trian", "did you mean train?"),
    ("model.features.nmels=40", "model.features.nmels", "did you mean model.features.n_mels"),
])
def test_unknown_config_keys_suggest_close_matches(override, unknown, suggestion, reliability):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"unknown key {re.escape(unknown)}; {re.escape(suggestion)}"):
        load_config(None, [override])
    reliability(f"config typo {key}", "Python", f"ConfigError '... {suggestion}'")


@pytest.mark.slow
def test_bad_config_values_reach_the_cli_without_traceback(tone_corpus, tmp_path, reliability):
    done = _run_cli("train", "--train", str(tone_corpus), "--dev", str(tone_corpus), "--out", str(tmp_path / "o"),
                    "train.lr=-1")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "train.lr" in done.stderr and not (tmp_path / "o").exists()
    reliability("asr train train.lr=-1", "CLI", "exit 2: 'train.lr: must be ...'")


# ---------------------------------------------------------------- 4. what kills leave behind
def test_resume_removes_leftovers_and_log_rows_past_the_checkpoint(tone_corpus, tmp_path, reliability):
    straight = tmp_path / "straight"
    _trainer(tone_corpus, straight, "train.max_steps=6").fit()
    out = tmp_path / "killed"
    with pytest.raises(Crash):
        after_step(_trainer(tone_corpus, out, "train.max_steps=6"), 5, _crash).fit()
    # what kills at other moments leave: half-written folders, swapped-out old copies, a half-written row
    (out / "checkpoints" / ".step-00000005.tmp-k1ll3d").mkdir()
    (out / "checkpoints" / ".step-00000005.tmp-k1ll3d" / "model.json").write_text("{")
    (out / ".best.tmp-k1ll3d").mkdir()
    (out / "best.old").mkdir()
    (out / ".train_log.csv.k1ll3d.tmp").write_text("step\n")
    with open(out / "train_log.csv", "a") as f:
        f.write("6,0,1.2")
    assert _steps(out / "train_log.csv")[-2:] == [5, 6]  # rows past the checkpoint (step 4)

    _trainer(tone_corpus, out, "train.max_steps=6").fit()
    for log in ("train_log.csv", "eval_log.csv"):
        assert _steps(out / log) == _steps(straight / log), log
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert leftovers == []
    reliability("resume after kills: temporaries, .old folders, log rows past the checkpoint", "Python",
                "removed on resume; logs cut back to the checkpoint's step")


def test_a_kill_while_pruning_old_checkpoints_leaves_only_whole_ones(tone_corpus, tmp_path, monkeypatch, reliability):
    import shutil

    real_rmtree = shutil.rmtree
    out = tmp_path / "o"

    def killed_midway(path, *args, **kwargs):
        files = sorted(Path(path).rglob("*"))
        if Path(path).parent.name == "checkpoints" and len(files) > 1:
            files[0].unlink()  # the first file is gone, then the process dies
            raise Crash()
        real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Crash):  # step 9's checkpoint prunes step 3's folder
        _trainer(tone_corpus, out, "train.max_steps=9").fit()
    monkeypatch.undo()
    for folder in (out / "checkpoints").glob("step-*"):
        load_model_files(folder)
        load_trainer_state(folder)
    reliability("kill while deleting an old checkpoint", "Python", "only whole checkpoints keep a step-* name")


def test_a_kill_between_swapping_folders_twice_loses_nothing(tmp_path, monkeypatch, reliability):
    final = tmp_path / "best"
    write_dir_atomically(final, lambda d: (d / "w").write_text("first"))
    final.rename(tmp_path / "best.old")  # a kill between the two renames of an earlier write
    real_replace = os.replace

    def killed(src, dst):
        raise Crash()
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Crash):
        write_dir_atomically(final, lambda d: (d / "w").write_text("second"))
    monkeypatch.setattr(os, "replace", real_replace)
    recover_dir(final)
    assert (final / "w").read_text() == "first"
    reliability("second kill while the first one's folder swap is unfinished", "Python", "the old folder survives")


# ---------------------------------------------------------------- 5. resuming with another model
@pytest.mark.slow
def test_resume_with_another_architecture_is_refused_before_writing(tone_corpus, tmp_path, reliability):
    out = tmp_path / "o"
    _trainer(tone_corpus, out, "train.max_steps=3").fit()
    config_before = (out / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"gru_hidden.*--restart"):
        _trainer(tone_corpus, out, "train.max_steps=6", "model.gru_hidden=64").fit()
    assert (out / "config.json").read_text() == config_before
    done = _run_cli("train", "--train", str(tone_corpus), "--dev", str(tone_corpus), "--out", str(out), "--no-progress",
                    *TINY_OVERRIDES, *RUN, "train.max_steps=6", "model.features.n_mels=32")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "features.n_mels" in done.stderr and "--restart" in done.stderr
    assert (out / "config.json").read_text() == config_before
    reliability("resume into an --out trained with another model", "CLI",
                "exit 2: '<out>: ... model settings differ: gru_hidden ...; use --restart or another --out'")


# ---------------------------------------------------------------- 6. SIGKILL at random moments
@pytest.mark.slow
def test_kill_loop_resumes_to_the_end(tmp_path, reliability):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kill_loop.py"), "--kills", "3", "--out",
                           str(tmp_path / "k"), "--json"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["kills"] >= 1 and report["kills"] + report["finished_before_kill"] == 3
    assert report["finished"] and report["bad_checkpoints"] == 0 and report["checkpoints_checked"] > 0
    assert report["logs_match_uninterrupted"] and report["same_weights_as_uninterrupted"] and report["ok"]
    reliability("SIGKILL at random moments, then the same command", "CLI", "finishes; every checkpoint loads")
