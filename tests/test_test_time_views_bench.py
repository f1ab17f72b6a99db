"""bench/test_time_views.py: test-time warps and speeds, fixed or chosen by the network's confidence."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from asr import load_model
from asr.metrics import error_rates

from .conftest import TEXTS, write_tone_corpus

_PATH = Path(__file__).resolve().parents[1] / "bench" / "test_time_views.py"
_spec = importlib.util.spec_from_file_location("bench_test_time_views", _PATH)
views = importlib.util.module_from_spec(_spec)
sys.modules["bench_test_time_views"] = views
_spec.loader.exec_module(views)


def test_the_plain_view_is_greedy_transcription_and_a_speaker_gets_one_factor(tmp_path):
    manifest = write_tone_corpus(tmp_path / "corpus")
    lines = [json.loads(line) | {"id": f"u{i}"} for i, line in enumerate(manifest.read_text().splitlines())]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "utt2spk").write_text("".join(f"u{i} {'ab'[i % 2]}\n" for i in range(len(lines))))
    results = views.main(["--manifest", str(manifest), "--utt2spk", str(tmp_path / "utt2spk"), "--warps", "0.9",
                          "1.0", "1.1", "--speeds", "1.1", "--threads", "1", "--out", str(tmp_path / "out")])
    rows = {r["view"]: r for r in results["rows"]}
    assert list(rows) == ["none", "warp 0.9, every utterance", "warp 1.1, every utterance",
                          "speed 1.1, every utterance", "warp, chosen per utterance",
                          "warp, chosen per speaker (2 speakers)", "speed, chosen per utterance",
                          "speed, chosen per speaker (2 speakers)"]
    model = load_model(None, backend="torch", precision="fp32")
    greedy = [t.text for t in model.transcribe([str(tmp_path / "corpus" / line["audio_filepath"]) for line in lines],
                                               decoder="greedy")]
    expected = error_rates(TEXTS, greedy)
    assert rows["none"]["hypotheses"] == greedy
    assert (rows["none"]["wer"], rows["none"]["cer"]) == pytest.approx((expected.wer, expected.cer))
    assert rows["warp 1.1, every utterance"]["hypotheses"] != greedy
    for name, row in rows.items():
        assert sum(row["factors"].values()) == len(TEXTS)
        if "per speaker" in name:  # three utterances each, all with their speaker's factor
            assert all(n % 3 == 0 for n in row["factors"].values())
    assert rows["warp 0.9, every utterance"]["factors"] == {"0.9": len(TEXTS)}
    assert "| none |" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == results["rows"]


def test_bad_factors_and_speaker_lists_are_clear_errors(tmp_path, capsys):
    manifest = write_tone_corpus(tmp_path / "corpus", texts=TEXTS[:1])
    with pytest.raises(SystemExit):
        views.main(["--manifest", str(manifest), "--speeds", "0", "--out", str(tmp_path / "out")])
    assert "factors from 0.5 to 2" in capsys.readouterr().err
    (tmp_path / "utt2spk").write_text("u0 a\nu1\n")
    with pytest.raises(SystemExit, match="utt2spk, line 2: not an utterance id and a speaker id: 'u1'"):
        views.main(["--manifest", str(manifest), "--utt2spk", str(tmp_path / "utt2spk"),
                    "--out", str(tmp_path / "out")])
