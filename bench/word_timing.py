"""Where the first word starts against where the speech starts, with and without moving early emissions.

    python bench/word_timing.py --manifest runs/manifests/dev.jsonl [--model DIR] [--decoder greedy|beam]

A bidirectional CTC model may spell an utterance's first letters on its very first frames, before the leading
silence is over (`asr.decoding.without_early_emissions`). This decodes each utterance twice from the same
posteriors, with that correction off (EARLY_FRAMES = 0) and on, and compares the first word's start with the
speech onset: the first 10 ms frame whose level is ONSET_DB above the utterance's 10th-percentile level (its
noise floor). That onset is a proxy, not a hand-made alignment; the text is the same either way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asr  # noqa: E402
import asr.decoding  # noqa: E402
from asr.audio import SAMPLE_RATE, load_audio  # noqa: E402
from asr.decoding import DECODERS  # noqa: E402
from asr.manifest import read_manifest  # noqa: E402
from asr.metrics import error_rates  # noqa: E402

ONSET_DB = 20.0
HOP = SAMPLE_RATE // 100  # 10 ms


def speech_onset(wave: torch.Tensor) -> float | None:
    """Seconds to the first 10 ms frame ONSET_DB above the noise floor (None: no such frame)."""
    frames = wave[: len(wave) // HOP * HOP].view(-1, HOP)
    level = 10 * torch.log10(frames.pow(2).mean(1) + 1e-12)
    loud = (level > torch.quantile(level, 0.1) + ONSET_DB).nonzero()
    return int(loud[0]) * HOP / SAMPLE_RATE if len(loud) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--manifest", required=True, help="e.g. speechocean762 dev from `asr prepare kaldi`")
    parser.add_argument("--decoder", default="greedy", choices=list(DECODERS))
    parser.add_argument("--within", type=float, default=0.15, help="seconds counted as on time")
    args = parser.parse_args()
    model = asr.load_model(args.model, precision="fp32")
    utts = read_manifest(args.manifest)
    waves = [load_audio(u.audio_filepath) for u in utts]
    onsets = [speech_onset(w) for w in waves]
    log_probs = model.posteriors(waves)
    early_frames = asr.decoding.EARLY_FRAMES
    print(f"{len(utts)} utterances of {args.manifest}, {args.decoder}; first word's start minus the speech onset:")
    print(f"| early emissions | WER | starts at 0 s | within {args.within} s | 10th / 50th / 90th percentile (s) |")
    print("|---|---|---|---|---|")
    for name, frames in (("as emitted", 0), ("moved (the default)", early_frames)):
        asr.decoding.EARLY_FRAMES = frames
        try:
            hyps = [model.decode(lp, len(w) / SAMPLE_RATE, w, decoder=args.decoder)
                    for lp, w in zip(log_probs, waves)]
        finally:
            asr.decoding.EARLY_FRAMES = early_frames
        gaps = np.array([h.words[0].start - o for h, o in zip(hyps, onsets) if h.words and o is not None])
        wer = error_rates([u.text for u in utts], [h.text for h in hyps]).wer
        p10, p50, p90 = np.percentile(gaps, [10, 50, 90])
        print(f"| {name} | {wer:.2%} | {sum(h.words[0].start == 0 for h in hyps if h.words)} of {len(gaps)} | "
              f"{np.mean(np.abs(gaps) <= args.within):.1%} | {p10:+.2f} / {p50:+.2f} / {p90:+.2f} |")


if __name__ == "__main__":
    main()
