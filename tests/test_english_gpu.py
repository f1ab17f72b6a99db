"""recipes/english/gpu.sh: the audio pack (size accounting), the time budget, and a dry run on the CPU."""

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import asr
from asr.config import ConfigError, load_config
from asr.manifest import read_manifest
from asr.train.trainer import Trainer

from .conftest import TINY_OVERRIDES, kaldi_split, tone_speech, write_fake_fsdd

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/english"


def _load(name: str):
    """A recipes/english module (they import each other by name, as when run as scripts)."""
    if str(RECIPE) not in sys.path:
        sys.path.insert(0, str(RECIPE))
    spec = importlib.util.spec_from_file_location(name, RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_pack = _load("gpu_pack")
gpu_train = _load("gpu_train")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    """Fake speechocean762 (6 train, 3 dev utterances) and FSDD (ann, bob, theo; 2 takes: 20 training files)."""
    root = tmp_path_factory.mktemp("corpora")
    kaldi_split(root / "so762" / "train", ["WE CALL IT BEAR", "ONE TWO", "A CAB", "BAD EGG", "FEE", "DIG A HOLE"])
    kaldi_split(root / "so762" / "dev", ["ONE TWO", "BEAR", "ACE"])
    return root / "so762", write_fake_fsdd(root / "fsdd", takes=2)


def _pack_args(corpora, out: Path, *more: str) -> list[str]:
    so762, fsdd = corpora
    return [str(out), "--so762", str(so762), "--fsdd", str(fsdd), "--dev-utterances", "2", "--jobs", "1", *more]


def test_pack_holds_the_training_audio_as_opus_within_its_budget(corpora, tmp_path, capsys):
    pack = tmp_path / "pack"
    gpu_pack.main(_pack_args(corpora, pack, "--kbps", "12", "--max-mib", "1"))
    info = gpu_pack.read_pack(pack)
    assert info["train"]["speechocean762"]["utterances"] == 6 and info["train"]["fsdd"]["utterances"] == 20
    assert info["train_utterances"] == 26 and info["dev_utterances"] == 2
    train = read_manifest(pack / "train.jsonl")
    assert not [u for u in train if "theo" in u.id]  # the test speaker stays out
    for line in (pack / "train.jsonl").read_text().splitlines() + (pack / "dev.jsonl").read_text().splitlines():
        path = json.loads(line)["audio_filepath"]
        assert not os.path.isabs(path) and sf.info(pack / path).subtype == "OPUS"
    on_disk = {p: p.stat().st_size for p in pack.rglob("*") if p.is_file()}
    assert sum(info["bytes"].values()) + on_disk[pack / "pack.json"] == sum(on_disk.values()) <= 2**20
    assert info["bytes"]["audio"] == sum(s for p, s in on_disk.items() if "audio" in p.parts)

    with pytest.raises(SystemExit) as exit_:  # over budget: a clear error, nothing written
        gpu_pack.main(_pack_args(corpora, tmp_path / "small", "--max-mib", "0.01"))
    assert exit_.value.code == 2 and not (tmp_path / "small").exists()
    assert "over --max-mib 0.01" in capsys.readouterr().err


def test_opus_files_lose_their_tag_padding_and_decode_the_same():
    buffer = io.BytesIO()
    sf.write(buffer, tone_speech("bad egg"), 16000, format="OGG", subtype="OPUS", compression_level=0.97)
    data = buffer.getvalue()
    first = 27 + data[26] + sum(data[27:27 + data[26]])  # OpusHead's page: our checksum is libogg's
    assert gpu_pack._ogg_crc(data[:22] + b"\0\0\0\0" + data[26:first]) == int.from_bytes(data[22:26], "little")
    stripped = gpu_pack.strip_tag_padding(data)
    assert len(stripped) < len(data) - 500
    (a, rate_a), (b, rate_b) = sf.read(io.BytesIO(data)), sf.read(io.BytesIO(stripped))
    assert rate_a == rate_b and np.array_equal(a, b) and len(a) > 0
    assert gpu_pack.strip_tag_padding(b"not ogg") == b"not ogg"


def test_model_folder_limits(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}").write_bytes(b"x")
    assert len(gpu_train.check_folder(tmp_path)) == 8
    (tmp_path / "f8").write_bytes(b"x")
    with pytest.raises(gpu_pack.PackError, match="9 files"):
        gpu_train.check_folder(tmp_path)
    (tmp_path / "f8").unlink()
    with open(tmp_path / "f0", "wb") as f:
        f.truncate(16 * 2**20 + 1)
    with pytest.raises(gpu_pack.PackError, match="f0"):
        gpu_train.check_folder(tmp_path)


def test_max_minutes_stops_after_the_step_in_progress_with_an_evaluation_and_a_checkpoint(tone_corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.max_minutes"):
        load_config(None, ["train.max_minutes=-1"])
    config = load_config(None, TINY_OVERRIDES + ["train.epochs=50", "train.max_minutes=1e-9"])
    trainer = Trainer(config, tone_corpus, tone_corpus, tmp_path, progress=False)
    result = trainer.fit()
    assert result.steps == 1 and trainer.latest_checkpoint().name == "step-00000001"
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "eval_log.csv"))] == ["1"]
    assert (tmp_path / "best" / "model.safetensors").exists()


def test_time_schedule_decays_the_learning_rate_with_the_minutes_when_they_run_out_first(tone_corpus, tmp_path):
    from asr.train.trainer import _lr_lambda
    steps_only = _lr_lambda(warmup=2, total=102, min_ratio=0.1)
    used = [0.0]
    timed = _lr_lambda(warmup=2, total=102, min_ratio=0.1, time_used=lambda: used[0])
    assert timed(0) == steps_only(0) == 0.5 and timed(52) == steps_only(52) == pytest.approx(0.55)
    used[0] = 0.5  # half the minutes spent after a tenth of the steps: half-way down the cosine
    assert timed(12) == pytest.approx(0.55) and steps_only(12) > 0.9
    used[0] = 3.0
    assert timed(12) == pytest.approx(0.1) and timed(0) == 0.5  # warm-up is counted in steps

    overrides = TINY_OVERRIDES + ["train.epochs=50", "train.max_minutes=1e-9", "train.warmup_steps=0"]
    for time_schedule, next_lr in (("false", 1.0), ("true", 0.2)):  # 50 epochs to go, or train.min_lr_ratio
        config = load_config(None, overrides + [f"train.time_schedule={time_schedule}"])
        trainer = Trainer(config, tone_corpus, tone_corpus, tmp_path / time_schedule, progress=False)
        trainer.fit()
        assert trainer.time_used > 1  # the budget was spent after the first step: the next would be at the floor
        assert trainer.scheduler.lr_lambdas[0](2) == pytest.approx(next_lr, abs=0.01)


@pytest.mark.slow
def test_gpu_recipe_dry_run_on_the_cpu(corpora, tmp_path):
    pack, out = tmp_path / "pack", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "EXP": str(tmp_path / "exp"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(RECIPE / "gpu.sh"), "prepare", *_pack_args(corpora, pack, "--max-mib", "1")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([str(RECIPE / "gpu.sh"), "train", str(pack), str(out), "train.precision=fp32",
                           "train.max_steps=3", "data.num_workers=0"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    assert {"model.json", "model.safetensors", "config.json", "train_log.csv", "eval_log.csv",
            "results.json"} <= files.keys() and len(files) <= 8
    assert 4 * 2**20 < files["model.safetensors"] <= 8 * 2**20  # gpu.yaml's whole network (2.9 M) in fp16
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3 and results["dev"]["utterances"] == 2 and not results["stopped_by_time"]
    assert 2.5 < results["epochs"] < 3.5  # one batch an epoch: the audio seen is the corpus three times over
    assert json.loads((out / "config.json").read_text())["train"]["max_minutes"] > 0  # gpu.yaml's time budget
    model = asr.load_model(out)
    assert isinstance(model.transcribe(tone_speech("one"), sample_rate=16000).text, str)


def _soup(pack: Path, out: Path, tmp: Path, *overrides: str, runs: str | None = None):
    env = {**os.environ, "PYTHON": sys.executable, "SOUP_TMP": str(tmp), "OMP_NUM_THREADS": "1"}
    if runs:
        env["SOUP_RUNS"] = runs
    return subprocess.run([str(RECIPE / "gpu_soup.sh"), str(pack), str(out), "1", "train.precision=fp32",
                           "data.num_workers=0", *overrides], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_gpu_soup_fine_tunes_the_shipped_model_four_ways_each_into_its_own_tar(corpora, tmp_path):
    import tarfile

    pack = tmp_path / "pack"
    gpu_pack.main(_pack_args(corpora, pack, "--max-mib", "1"))
    done = _soup(pack, tmp_path / "out", tmp_path / "tmp", "train.max_steps=1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    configs = {}
    for name in ("ft8", "ftwarp", "ftreg", "ftlow"):
        assert f"{name}: dev WER" in done.stdout
        with tarfile.open(tmp_path / "out" / f"{name}.tar") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            assert {"model.safetensors", "model.json", "results.json", "config.json", "run.log"} <= members.keys()
            assert len(members) <= 8 and members["model.safetensors"].size < 8 * 2**20
            configs[name] = json.load(tar.extractfile(members["config.json"]))
    assert all(Path(c["train"]["init_from"]).resolve() == ROOT / "asr/default_model" for c in configs.values())
    assert sorted(c["train"]["seed"] for c in configs.values()) == [1, 2, 3, 4]
    assert configs["ftwarp"]["model"]["features"]["vtlp_warp"] == [0.9, 1.1]
    assert configs["ftreg"]["model"]["dropout"] == 0.3 and configs["ftlow"]["train"]["ema_decay"] == 0.999

    # a bad override: each run fails and says why, and its log still comes back in its tar
    done = _soup(pack, tmp_path / "bad", tmp_path / "tmp2", "train.nonsense=1", runs="ft8 ftlow")
    assert done.returncode == 1 and "ft8: failed" in done.stdout and "ftlow: failed" in done.stdout
    with tarfile.open(tmp_path / "bad" / "ftlow.tar") as tar:
        log = tar.extractfile("soup-out-ftlow/run.log").read().decode()
    assert "nonsense" in log and not (tmp_path / "bad" / "ftwarp.tar").exists()
    assert _soup(pack, tmp_path / "bad", tmp_path / "tmp2", runs="ft9").returncode == 2  # no such run
