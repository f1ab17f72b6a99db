"""Turn corpora in their own layouts into manifests: FSDD, Kaldi data folders, LibriSpeech."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..audio import AudioError, audio_duration
from ..errors import ASRError
from ..manifest import Utterance, read_utf8, write_manifest

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)$")


class CorpusError(ASRError, ValueError):
    """A corpus folder that is missing or not in the expected layout."""


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise CorpusError(f"{path}: {what} not found (pass the folder that holds it)")
    return path


def _with_durations(items: list[tuple[str, Path, str]]) -> list[Utterance]:
    """(id, path, text) -> Utterances with durations read from the file headers, in parallel."""
    def one(item: tuple[str, Path, str]) -> Utterance:
        utt_id, path, text = item
        return Utterance(str(path.resolve()), audio_duration(path), text, utt_id)
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, items))


def prepare_fsdd(data_dir: str | Path, out_dir: str | Path, test_speaker: str = "theo",
                 dev_takes: int | None = None) -> dict[str, Path]:
    """Free Spoken Digit Dataset -> train/dev/test manifests.

    test: every recording of `test_speaker` (unseen in training). dev: the last `dev_takes` takes
    (default: a tenth) of each digit of the other speakers, for model selection. train: the rest.
    """
    root = Path(data_dir)
    rec = root / "recordings" if (root / "recordings").is_dir() else root
    _require_dir(rec, "FSDD recordings folder")
    files = sorted(p for p in rec.iterdir() if p.suffix.lower() in (".wav", ".flac") and _FSDD_NAME.match(p.stem))
    if not files:
        raise CorpusError(f"{rec}: no files named like 0_george_0.flac")
    speakers = sorted({_FSDD_NAME.match(p.stem).group(2) for p in files})
    if test_speaker not in speakers:
        raise CorpusError(f"{rec}: test speaker {test_speaker!r} not among {speakers}")
    takes = max(int(_FSDD_NAME.match(p.stem).group(3)) for p in files) + 1
    dev_takes = max(1, takes // 10) if dev_takes is None else dev_takes
    if not 0 < dev_takes < takes:
        raise CorpusError(f"{rec}: cannot hold out {dev_takes} of {takes} takes per digit for dev")
    splits: dict[str, list] = {"train": [], "dev": [], "test": []}
    for p in files:
        digit, speaker, take = _FSDD_NAME.match(p.stem).groups()
        split = "test" if speaker == test_speaker else ("dev" if int(take) >= takes - dev_takes else "train")
        splits[split].append((p.stem, p, DIGIT_WORDS[int(digit)]))
    out = Path(out_dir)
    paths = {}
    for name, items in splits.items():
        paths[name] = out / f"{name}.jsonl"
        write_manifest(_with_durations(items), paths[name])
    return paths


def _read_kaldi_table(path: Path) -> dict[str, str]:
    table = {}
    for n, line in enumerate(read_utf8(path, CorpusError).split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        if key in table:
            raise CorpusError(f"{path}:{n}: duplicate key {key}")
        table[key] = value.strip()
    return table


def prepare_kaldi(split_dir: str | Path, manifest: str | Path) -> Path:
    """A Kaldi data folder (`text`, `wav.scp` with file paths, optional `utt2spk`) -> manifest."""
    folder = _require_dir(Path(split_dir), "Kaldi data folder")
    for name in ("text", "wav.scp"):
        if not (folder / name).is_file():
            raise CorpusError(f"{folder / name}: not found (a Kaldi data folder needs text and wav.scp)")
    if (folder / "segments").exists():
        raise CorpusError(f"{folder / 'segments'}: segmented recordings are not supported; "
                          "cut them into files first")
    texts = _read_kaldi_table(folder / "text")
    wavs = _read_kaldi_table(folder / "wav.scp")
    items = []
    for utt, text in texts.items():
        if utt not in wavs:
            raise CorpusError(f"{folder / 'wav.scp'}: no audio for utterance {utt}")
        entry = wavs[utt]
        if entry.endswith("|"):
            raise CorpusError(f"{folder / 'wav.scp'}: {utt} is a command pipe; only file paths are supported")
        path = Path(entry) if Path(entry).is_absolute() else folder / entry
        items.append((utt, path, text))
    utterances = _with_durations(items)
    write_manifest(utterances, manifest)
    return Path(manifest)


def prepare_librispeech(root: str | Path, manifest: str | Path) -> Path:
    """A LibriSpeech split (`speaker/chapter/*.flac` + `speaker-chapter.trans.txt`) -> manifest."""
    root = _require_dir(Path(root), "LibriSpeech folder")
    items = []
    for trans in sorted(root.glob("*/*/*.trans.txt")):
        for n, line in enumerate(read_utf8(trans, CorpusError).split("\n"), start=1):
            utt, _, text = line.strip().partition(" ")
            if not utt:
                continue
            audio = trans.parent / f"{utt}.flac"
            if not audio.is_file():
                raise CorpusError(f"{trans}:{n}: audio {audio.name} not found")
            items.append((utt, audio, text))
    if not items:
        raise CorpusError(f"{root}: no speaker/chapter/*.trans.txt files (is this a LibriSpeech split folder?)")
    write_manifest(_with_durations(items), manifest)
    return Path(manifest)


__all__ = ["AudioError", "CorpusError", "prepare_fsdd", "prepare_kaldi", "prepare_librispeech"]
