"""bench/peers.py without the peer packages: input preparation, timing protocol, scoring and the table."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import torch

from asr.device import describe_machine

from .conftest import TEXTS, write_tone_corpus

_PATH = Path(__file__).resolve().parents[1] / "bench" / "peers.py"
_spec = importlib.util.spec_from_file_location("bench_peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules["bench_peers"] = peers  # dataclasses look their module up
_spec.loader.exec_module(peers)


@dataclass
class EchoRecognizer:
    """Answers each clip with a fixed script, remembering how often it was called."""

    answers: dict[int, str]
    name: str = "echo"
    settings: dict = field(default_factory=dict)
    calls: int = 0

    def transcribe(self, wave: torch.Tensor) -> str:
        self.calls += 1
        return self.answers[len(wave)]


def _result(name: str, rtf: float, wer: float = 0.5) -> "peers.SystemResult":
    return peers.SystemResult(name, {"k": 1}, ["x"], decode_seconds=rtf * 10, audio_seconds=10.0, wer=wer, cer=wer / 2)


def test_manifest_clips_keep_order_and_limit(tmp_path):
    manifest = write_tone_corpus(tmp_path / "corpus")
    clips = peers.load_clips(manifest=manifest, limit=3)
    assert [c.text for c in clips] == TEXTS[:3]
    assert all(c.wave.dtype == torch.float32 and c.wave.ndim == 1 for c in clips)
    assert clips[0].seconds == pytest.approx(len(clips[0].wave) / 16_000)


def test_kaldi_folder_becomes_a_manifest(tmp_path):
    write_tone_corpus(tmp_path / "kaldi")
    (tmp_path / "kaldi" / "text").write_text("".join(f"u{i} {t.upper()}\n" for i, t in enumerate(TEXTS)))
    (tmp_path / "kaldi" / "wav.scp").write_text("".join(f"u{i} utt{i}.wav\n" for i in range(len(TEXTS))))
    clips = peers.load_clips(kaldi=tmp_path / "kaldi", limit=2, work_dir=tmp_path / "out")
    assert [(c.id, c.text) for c in clips] == [("u0", "ONE TWO"), ("u1", "CAB")]
    assert (tmp_path / "out" / "manifest.jsonl").is_file()
    with pytest.raises(ValueError):
        peers.load_clips(manifest=tmp_path / "m.jsonl", kaldi=tmp_path / "kaldi")


def test_run_system_warms_up_once_and_scores_with_our_normaliser(tmp_path):
    clips = peers.load_clips(manifest=write_tone_corpus(tmp_path / "corpus"), limit=2)
    # a right answer up to case, punctuation and digits, and one wrong word of two
    echo = EchoRecognizer({len(clips[0].wave): "One, 2!", len(clips[1].wave): "cab extra"})
    result = peers.run_system(echo, clips)
    assert echo.calls == len(clips) + 1  # the warm-up is not part of the hypotheses
    assert result.hypotheses == ["One, 2!", "cab extra"]
    assert result.wer == pytest.approx(1 / 3)  # one insertion over three reference words
    assert result.audio_seconds == pytest.approx(sum(c.seconds for c in clips))
    assert result.rtf == pytest.approx(result.decode_seconds / result.audio_seconds)


def test_table_and_ratios_relative_to_whisper():
    results = [_result(peers.WHISPER, 0.4), _result("fast", 0.05), _result("slow", 0.8)]
    table = peers.markdown_table(results)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert len(rows) == len(results)
    assert "reference" in rows[0] and "8.0× smaller" in rows[1] and "2.0× larger" in rows[2]
    assert "50.00%" in rows[1] and "0.0500" in rows[1]
    assert peers.ratio_sentences(results) == ["fast RTF is 8.0× smaller than Whisper tiny.en's",
                                              "slow RTF is 2.0× larger than Whisper tiny.en's"]
    assert peers.ratio_sentences(results[1:]) == ["Whisper tiny.en was not run: no speed ratios"]


def test_machine_is_named():
    info = peers.machine_info(threads=3)
    assert info["cores"] >= 1 and info["cpu"] and info["ctranslate2_cpu_threads"] == 3
    assert info["versions"]["torch"] == metadata.version("torch") and "pocketsphinx" in info["versions"]
    line = peers.machine_summary(info)
    assert f"{info['cpu']}, {info['cores']} cores" in line and f"torch {info['versions']['torch']}" in line
    assert "cpu_threads 3" in line and f"load average {info['load_average'][0]}" in line


def test_the_machine_description_every_bench_uses():
    info = describe_machine("cpu")
    assert info["gpu"] is None and info["torch_threads"] == torch.get_num_threads()
    assert set(info["versions"]) == {"torch", "torchaudio", "onnxruntime"}
    assert len(info["load_average"]) == 3


@pytest.mark.parametrize("script", ["decoders", "inference_speed", "long_audio", "quantization", "train_speed"])
def test_bench_scripts_import(script):
    """Each script's imports resolve when run as `python bench/X.py` (from bench/, not from recipes/)."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", _PATH.parent / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)


def test_pocketsphinx_transcribes_tone_audio(tmp_path):
    """The real peer on a clip, only where it is installed (it is small and offline)."""
    pytest.importorskip("pocketsphinx", reason="pocketsphinx not installed (pip install -e '.[peers]')")
    clip = peers.load_clips(manifest=write_tone_corpus(tmp_path / "corpus"), limit=1)[0]
    recognizer = peers.PocketsphinxRecognizer()
    assert isinstance(recognizer.transcribe(clip.wave), str)
    assert recognizer.settings["dict"] == "cmudict-en-us.dict"


def test_one_system_runs_or_says_why_not(tmp_path, trained_tiny_model):
    """run_one_system (what each fresh process runs): our model's rows, or the reason it cannot run."""
    import argparse
    clips = peers.load_clips(manifest=write_tone_corpus(tmp_path / "corpus"), limit=2)
    args = argparse.Namespace(threads=1, model=str(tmp_path / "absent"), compute_type="int8", beam_size=5)
    assert "no model folder" in peers.run_one_system("ours", args, clips)
    args.model = str(trained_tiny_model)
    results = peers.run_one_system("ours", args, clips)
    assert [r.name for r in results][0] == "ours (greedy)"
    assert results[0].settings["network"] == "torch int8"  # what ran the network: this folder has no model.onnx
    assert all(len(r.hypotheses) == 2 and r.audio_seconds > 0 for r in results)
