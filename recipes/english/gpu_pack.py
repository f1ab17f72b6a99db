"""Pack the English model's training audio small enough to carry to a GPU machine (`gpu.sh prepare`).

    python recipes/english/gpu_pack.py PACK [--kbps 12] [--max-mib 26] [--wheels] [--synthetic TRAIN.jsonl]

speechocean762 train and the FSDD training takes (theo, the test speaker, and the dev takes left out),
optionally a synthetic corpus's training manifest, re-encoded as Ogg Opus at about --kbps under
PACK/audio/train/, and the first --dev-utterances of speechocean762 dev likewise under PACK/audio/dev/.
PACK/train.jsonl and PACK/dev.jsonl give relative paths, so the folder works wherever it is copied.
--wheels adds PACK/wheels/: this environment's versions of the packages a bare PyTorch image lacks
(soundfile, cffi, pycparser, jiwer, rapidfuzz, num2words), for CPython 3.12 on x86_64 Linux.
PACK/pack.json says what is in it and how big; the whole folder must stay within --max-mib, else nothing
is written. The folder is replaced atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import soundfile as sf

from asr.audio import SAMPLE_RATE, load_audio
from asr.errors import ASRError
from asr.files import write_dir_atomically
from asr.manifest import Utterance, read_manifest
from asr.train.corpora import prepare_fsdd, prepare_kaldi

SHARED = Path(__file__).resolve().parents[3] / "shared/data"
WHEELS = ("soundfile", "cffi", "pycparser", "jiwer", "rapidfuzz", "num2words")  # not in the GPU image
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MIB = 2**20


class PackError(ASRError, ValueError):
    """A pack that cannot be made (over its size budget, wheels not found) or read; names the folder."""


def opus_level(kbps: float) -> float:
    """libsndfile's compression level for an Opus bitrate: it maps 0..1 linearly onto about 262..6 kbit/s."""
    return min(1.0, max(0.0, 1 - (kbps - 6) / 256))


def _ogg_crc(data: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04c11db7, most significant bit first, no final xor)."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def strip_tag_padding(data: bytes) -> bytes:
    """An Ogg Opus file without the ~800 zero bytes libsndfile pads its OpusTags page with (RFC 7845 lets
    them go); the file as it was when its second page is not a lone OpusTags packet."""
    first = 27 + data[26] + sum(data[27:27 + data[26]]) if data[:4] == b"OggS" and len(data) > 27 else 0
    head = data[first:first + 27]
    if not first or head[:4] != b"OggS" or len(head) < 27:
        return data
    lacing = data[first + 27:first + 27 + head[26]]
    body_at = first + 27 + len(lacing)
    body = data[body_at:body_at + sum(lacing)]
    if not body.startswith(b"OpusTags") or any(n != 255 for n in lacing[:-1]) or lacing[-1] == 255:
        return data
    end = 12 + int.from_bytes(body[8:12], "little")  # past the vendor string
    count, end = int.from_bytes(body[end:end + 4], "little"), end + 4
    for _ in range(count):
        if end + 4 > len(body):
            return data
        end += 4 + int.from_bytes(body[end:end + 4], "little")
    if end > len(body):
        return data
    segments = bytes([255] * (end // 255) + [end % 255])
    page = bytearray(head[:22] + b"\0\0\0\0" + bytes([len(segments)]) + segments + body[:end])
    page[22:26] = _ogg_crc(page).to_bytes(4, "little")
    return data[:first] + bytes(page) + data[body_at + len(body):]


def encode(utt: Utterance, path: Path, level: float) -> Utterance:
    """Write `utt`'s audio (16 kHz mono) as Ogg Opus to `path`; its manifest entry, the path as given."""
    wave = load_audio(utt.audio_filepath).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sf.write(buffer, wave, SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=level)
    path.write_bytes(strip_tag_padding(buffer.getvalue()))
    return Utterance(str(path), len(wave) / SAMPLE_RATE, utt.text, utt.id)


def encode_all(utterances: list[Utterance], root: Path, folder: str, level: float, jobs: int) -> list[dict]:
    """Encode into root/folder/NNNNN_ID.opus; manifest rows with paths relative to root."""
    names = [f"{folder}/{n:05d}_{re.sub(r'[^A-Za-z0-9._-]', '_', u.id)[:60]}.opus" for n, u in enumerate(utterances)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # libsndfile and torch release the GIL
        done = list(pool.map(lambda a: encode(a[0], root / a[1], level), zip(utterances, names)))
    return [{"audio_filepath": name, "duration": round(u.duration, 4), "text": u.text, "id": u.id}
            for name, u in zip(names, done)]


def download_wheels(folder: Path) -> None:
    """This environment's versions of WHEELS, built for CPython 3.12 on x86_64 Linux (pip download)."""
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *platforms, "--dest", str(folder), *pins]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise PackError(f"{folder}: pip download {' '.join(pins)} failed: {done.stderr.strip()[-500:]}")


def folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes under each top-level entry of `folder` (a folder's files added up)."""
    sizes: dict[str, int] = {}
    for p in folder.rglob("*"):
        if p.is_file():
            top = p.relative_to(folder).parts[0]
            sizes[top] = sizes.get(top, 0) + p.stat().st_size
    return sizes


def sources(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, list[Utterance]], list[Utterance]]:
    """The training utterances by source, and the dev subset."""
    data = Path(args.so762)
    train = {"speechocean762": read_manifest(prepare_kaldi(data / "train", scratch / "so762_train.jsonl")),
             "fsdd": read_manifest(prepare_fsdd(args.fsdd, scratch / "fsdd")["train"])}
    if args.synthetic:
        train["synthetic"] = read_manifest(args.synthetic)[:args.synthetic_utterances]
    dev = read_manifest(prepare_kaldi(data / "dev", scratch / "so762_dev.jsonl"))[:args.dev_utterances]
    return train, dev


def make_pack(args: argparse.Namespace) -> dict:
    """Write the pack folder; returns what its pack.json says, and total_bytes."""
    level = opus_level(args.kbps)
    with tempfile.TemporaryDirectory() as scratch:
        train, dev = sources(args, Path(scratch))
    summary: dict = {}

    def write(tmp: Path) -> None:
        rows = [r for name, utts in train.items() for r in encode_all(utts, tmp, f"audio/train/{name}", level,
                                                                       args.jobs)]
        dev_rows = encode_all(dev, tmp, "audio/dev", level, args.jobs)
        for name, manifest_rows in (("train.jsonl", rows), ("dev.jsonl", dev_rows)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in manifest_rows), encoding="utf-8")
        if args.wheels:
            download_wheels(tmp / "wheels")
        audio_seconds = sum(r["duration"] for r in rows + dev_rows)
        sizes = folder_bytes(tmp)
        summary.update({
            "train": {name: {"utterances": len(u), "hours": round(sum(x.duration for x in u) / 3600, 3)}
                      for name, u in train.items()},
            "train_utterances": len(rows), "train_hours": round(sum(r["duration"] for r in rows) / 3600, 3),
            "dev_utterances": len(dev_rows), "dev_hours": round(sum(r["duration"] for r in dev_rows) / 3600, 3),
            "opus_kbps_asked": args.kbps, "opus_compression_level": round(level, 4),
            "audio_kbps": round(sizes.get("audio", 0) * 8 / max(audio_seconds, 1e-9) / 1000, 2),
            "bytes": sizes, "max_mib": args.max_mib,  # bytes: each part but pack.json
        })
        (tmp / "pack.json").write_text(json.dumps(summary, indent=2))
        total = sum(folder_bytes(tmp).values())
        if total > args.max_mib * MIB:
            raise PackError(f"{args.out}: the pack would be {total / MIB:.1f} MiB, over --max-mib {args.max_mib} "
                            f"({', '.join(f'{k} {v / MIB:.1f} MiB' for k, v in sorted(sizes.items()))}); "
                            "lower --kbps, or pack less")
        summary["total_bytes"] = total

    write_dir_atomically(args.out, write)
    return summary


def read_pack(folder: str | Path) -> dict:
    """A pack's pack.json (checking that its manifests are there)."""
    folder = Path(folder)
    for name in ("pack.json", "train.jsonl", "dev.jsonl"):
        if not (folder / name).is_file():
            raise PackError(f"{folder / name}: not found (make the pack with `gpu.sh prepare {folder}`)")
    try:
        return json.loads((folder / "pack.json").read_text())
    except ValueError as e:
        raise PackError(f"{folder / 'pack.json'}: not JSON ({e})") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="pack folder to write (replaced)")
    parser.add_argument("--so762", default=str(SHARED / "speechocean762"), help="speechocean762 (train/, dev/)")
    parser.add_argument("--fsdd", default=str(SHARED / "fsdd"), help="FSDD folder (theo is the test speaker)")
    parser.add_argument("--synthetic", help="a synthetic corpus's training manifest to add (recipes/synthetic)")
    parser.add_argument("--synthetic-utterances", type=int, help="only its first N utterances")
    parser.add_argument("--dev-utterances", type=int, default=300, help="the first N of speechocean762 dev")
    parser.add_argument("--kbps", type=float, default=12.0, help="Opus bitrate (kbit/s) to aim at")
    parser.add_argument("--max-mib", type=float, default=26.0, help="the most the whole pack may take (MiB)")
    parser.add_argument("--wheels", action="store_true", help="add wheels for a bare PyTorch image (pip download)")
    parser.add_argument("--jobs", type=int, default=2, help="encoding threads")
    args = parser.parse_args(argv)
    try:
        summary = make_pack(args)
    except ASRError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{args.out}: {summary['train_utterances']} training utterances ({summary['train_hours']} h), "
          f"{summary['dev_utterances']} dev ({summary['dev_hours']} h), audio at {summary['audio_kbps']} kbit/s, "
          f"{summary['total_bytes'] / MIB:.1f} MiB in all")


if __name__ == "__main__":
    main()
