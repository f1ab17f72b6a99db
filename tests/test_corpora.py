import numpy as np
import pytest
import soundfile as sf

from asr.manifest import read_manifest
from asr.train.corpora import CorpusError, prepare_fsdd, prepare_kaldi, prepare_librispeech

from .conftest import SHARED_DATA


def _wav(path, seconds=0.5, rate=16000, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * rate), dtype=np.float32) + 0.01, rate, format=fmt)


def test_fsdd_speaker_disjoint_split(tmp_path):
    for speaker in ("ann", "bob", "cy"):
        for digit in range(10):
            for take in range(4):
                _wav(tmp_path / "recordings" / f"{digit}_{speaker}_{take}.flac", 0.3, 8000)
    paths = prepare_fsdd(tmp_path, tmp_path / "m", test_speaker="cy", dev_takes=1)
    train, dev, test = (read_manifest(paths[k]) for k in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (60, 20, 40)
    assert all("_cy_" in u.id for u in test) and not any("_cy_" in u.id for u in train + dev)
    assert all(u.id.endswith("_3") for u in dev)
    assert {u.text for u in test} == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert abs(train[0].duration - 0.3) < 1e-3
    with pytest.raises(CorpusError, match="test speaker 'zed'"):
        prepare_fsdd(tmp_path, tmp_path / "m", test_speaker="zed")


def test_kaldi_folder(tmp_path):
    split = tmp_path / "train"
    _wav(split / "audio" / "u1.wav", 1.0)
    _wav(split / "audio" / "u2.flac", 0.5, fmt="FLAC")
    (split / "text").write_text("u1 HELLO THERE\nu2 GOOD BYE\n")
    (split / "wav.scp").write_text("u1 audio/u1.wav\nu2 audio/u2.flac\n")
    utts = read_manifest(prepare_kaldi(split, tmp_path / "train.jsonl"))
    assert [(u.id, u.text, round(u.duration, 2)) for u in utts] == [("u1", "HELLO THERE", 1.0), ("u2", "GOOD BYE", 0.5)]
    (split / "wav.scp").write_text("u1 audio/u1.wav\n")
    with pytest.raises(CorpusError, match=r"wav\.scp: no audio for utterance u2"):
        prepare_kaldi(split, tmp_path / "x.jsonl")
    (split / "wav.scp").write_text("u1 sox audio/u1.wav -t wav - |\nu2 audio/u2.flac\n")
    with pytest.raises(CorpusError, match="command pipe"):
        prepare_kaldi(split, tmp_path / "x.jsonl")
    with pytest.raises(CorpusError, match="not found"):
        prepare_kaldi(tmp_path / "nope", tmp_path / "x.jsonl")


def test_librispeech_layout(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    for spk, chap, n in (("19", "198", 2), ("26", "495", 1)):
        lines = []
        for i in range(n):
            utt = f"{spk}-{chap}-{i:04d}"
            _wav(root / spk / chap / f"{utt}.flac", 0.4 + i * 0.1, fmt="FLAC")
            lines.append(f"{utt} SOME WORDS NUMBER {i}")
        (root / spk / chap / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    utts = read_manifest(prepare_librispeech(root, tmp_path / "dev.jsonl"))
    assert [u.id for u in utts] == ["19-198-0000", "19-198-0001", "26-495-0000"]
    assert utts[1].text == "SOME WORDS NUMBER 1" and abs(utts[1].duration - 0.5) < 1e-3
    (root / "26" / "495" / "26-495-0000.flac").unlink()
    with pytest.raises(CorpusError, match=r"26-495\.trans\.txt:1: audio 26-495-0000\.flac not found"):
        prepare_librispeech(root, tmp_path / "dev.jsonl")
    with pytest.raises(CorpusError, match="no speaker/chapter"):
        prepare_librispeech(tmp_path, tmp_path / "x.jsonl")


@pytest.mark.skipif(not (SHARED_DATA / "speechocean762" / "dev").is_dir(),
                    reason=f"speechocean762 not found under {SHARED_DATA}")
def test_real_speechocean762_dev(tmp_path):
    utts = read_manifest(prepare_kaldi(SHARED_DATA / "speechocean762" / "dev", tmp_path / "dev.jsonl"))
    assert len(utts) == 1260
    assert 0.5 < sum(u.duration for u in utts) / len(utts) < 10


def test_cli_prepares_fsdd_from_its_one_folder(tmp_path, capsys):
    from asr.cli import main

    for speaker in ("ann", "theo"):
        for digit in range(10):
            for take in range(2):
                _wav(tmp_path / "fsdd" / "recordings" / f"{digit}_{speaker}_{take}.flac", 0.3, 8000)
    main(["prepare", "fsdd", "--data", str(tmp_path / "fsdd"), "--out", str(tmp_path / "m")])
    assert "test: " in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "m" / "test.jsonl")) == 20
    with pytest.raises(SystemExit) as stop:
        main(["prepare", "fsdd", "--data", str(tmp_path / "fsdd"), str(tmp_path), "--out", str(tmp_path / "n")])
    assert stop.value.code == 2 and "fsdd takes one --data folder, got 2" in capsys.readouterr().err
