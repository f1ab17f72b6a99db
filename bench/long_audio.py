"""Peak memory and time of transcribing one long file: 10 minutes against 60 minutes, the same model.

    python bench/long_audio.py [--model DIR] [--minutes 10 60] [--decoder greedy|beam] [--source DIR]

Each file is real speech: the speechocean762 dev recordings (--source, default ../shared/data/
speechocean762/dev) one after the other, with 0.5 s pauses, written as 16 kHz FLAC block by block. Each
is transcribed in a fresh process (`asr.load_model(...).transcribe(path)`), which reports its peak
resident memory (ru_maxrss) and wall time. Memory should not grow with the length of the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asr.audio import SAMPLE_RATE, load_audio  # noqa: E402
from asr.device import describe_machine, machine_line  # noqa: E402

MEASURE = """
import json, resource, sys, time, asr
model = asr.load_model(sys.argv[1] or None, device="cpu")
start = time.perf_counter()
result = model.transcribe(sys.argv[2], decoder=sys.argv[3])
print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "words": len(result.words),
                  "duration": result.duration,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def write_speech(path: Path, minutes: float, source: Path) -> None:
    """`minutes` of the source recordings in a loop, with pauses, written one recording at a time."""
    files = sorted(source.glob("**/*.opus")) or sorted(source.glob("**/*.flac")) or sorted(source.glob("**/*.wav"))
    if not files:
        raise SystemExit(f"no audio under {source}")
    pause = np.zeros(SAMPLE_RATE // 2, np.float32)
    needed, written = int(minutes * 60 * SAMPLE_RATE), 0
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1, format="FLAC") as f:
        while written < needed:
            for file in files:
                wave = np.concatenate([load_audio(file).numpy(), pause])[: needed - written]
                f.write(wave)
                written += len(wave)
                if written >= needed:
                    break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model folder (default: the shipped model)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--decoder", default="greedy", choices=["greedy", "beam"])
    parser.add_argument("--source", default=str(ROOT.parent / "shared/data/speechocean762/dev"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in args.minutes:
            path = Path(tmp) / f"{minutes:g}min.flac"
            write_speech(path, minutes, Path(args.source))
            out = subprocess.run([sys.executable, "-c", MEASURE, args.model, str(path), args.decoder],
                                 capture_output=True, text=True, check=True)
            rows.append({"minutes": minutes, **json.loads(out.stdout.strip().splitlines()[-1])})
            path.unlink()
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{machine_line(describe_machine())}; model {args.model or 'shipped'}, {args.decoder}")
    print("| audio | peak RSS | time | words |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['minutes']:g} min | {r['peak_rss_mb']} MB | {r['seconds']} s | {r['words']:,} |")
    if len(rows) > 1:
        print(f"\npeak RSS ratio, {rows[-1]['minutes']:g} against {rows[0]['minutes']:g} min: "
              f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
