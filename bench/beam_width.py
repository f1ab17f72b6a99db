"""Beam search width and LM against accuracy and time: the same posteriors decoded at several search widths,
with the model's LM or with each of several (--lms, e.g. smaller ones).

    python bench/beam_width.py --model asr/default_model --manifest dev.jsonl --widths 30:3:6 100:4:8 300:5:10
    python bench/beam_width.py --model asr/default_model --manifest dev.jsonl --widths 300:5:10 --lms lm4 lm3
    python bench/beam_width.py --model asr/default_model --manifest dev.jsonl --widths 300:5:10 --skip-blank 1 0.999

A width is BEAM:TOKENS:THRESHOLD (hypotheses kept, most likely characters tried per frame, log-score
distance below the best at which a hypothesis is dropped). The network runs once; every width decodes all
utterances with the model's LM and α/β (or --lm-weight/--word-score), as `asr evaluate --decoder beam` would.
--skip-blank sets the blank probability above which a run of frames is searched as one (the search's SKIP_BLANK;
1 searches every frame), one set of rows per value.
Prints a markdown table: the LM and the size of its lm.bin, WER, CER, decode seconds, the decoding's real-time
factor and its time against the first row's, from one run; names the machine. Time is the fastest of --repeats passes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import asr
from asr.device import describe_machine, machine_line
from asr.files import write_text_atomically
from asr.lm import beam_search
from asr.lm.language_model import LanguageModel
from asr.lm.tune import hear, transcripts
from asr.manifest import read_manifest
from asr.metrics import error_rates


@dataclass
class Width:
    beam_size: int
    beam_size_token: int
    beam_threshold: float

    @classmethod
    def parse(cls, text: str) -> "Width":
        try:
            beam, tokens, threshold = text.split(":")
            return cls(int(beam), int(tokens), float(threshold))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: a width is BEAM:TOKENS:THRESHOLD, e.g. 300:5:10") from None

    def __str__(self) -> str:
        return f"{self.beam_size}:{self.beam_size_token}:{self.beam_threshold:g}"


def measure(model: asr.ASRModel, manifest: str, widths: list[Width], repeats: int = 1,
            lms: list[str | Path] | None = None, skip_blanks: list[float] | None = None,
            **decoding) -> tuple[list[dict], float]:
    """WER, CER and decode seconds of each LM (default: the model's) at each width and each SKIP_BLANK (default:
    the search's own) on the manifest; and the audio seconds decoded."""
    utts = read_manifest(manifest)
    heard = hear(model, utts, progress=False)
    refs = [u.text for u in utts]
    rows = []
    for lm in [LanguageModel.load(d) for d in lms] if lms else [model.lm]:
        decoder = asr.ASRModel(model.model, model.vocab, model.meta, lm=lm, decoding=model.decoding,
                               onnx=model.onnx, precision=model.precision)  # the same network with this LM
        for width, skip_blank in itertools.product(widths, skip_blanks or [beam_search.SKIP_BLANK]):
            options = decoder.options(decoder="beam", lexicon=True, hotwords=[], beam_size=width.beam_size,
                                      beam_size_token=width.beam_size_token, beam_threshold=width.beam_threshold,
                                      **decoding)[1]
            seconds, shipped = float("inf"), beam_search.SKIP_BLANK
            try:
                beam_search.SKIP_BLANK = skip_blank
                transcripts(decoder, heard[:1], options)  # builds the search (lexicon, LM) outside the timing
                for _ in range(max(1, repeats)):
                    start = time.perf_counter()
                    hyps = transcripts(decoder, heard, options)
                    seconds = min(seconds, time.perf_counter() - start)
            finally:
                beam_search.SKIP_BLANK = shipped
            rates = error_rates(refs, hyps)
            rows.append({"lm": str(lm.folder), "lm_mib": lm.binary.stat().st_size / 2**20, "width": str(width),
                         "skip_blank": skip_blank, "lm_weight": options.lm_weight,
                         "word_score": options.word_score, "blank_penalty": options.blank_penalty,
                         "wer": rates.wer, "cer": rates.cer, "decode_seconds": seconds})
    return rows, sum(duration for _, duration, _ in heard)


def table(rows: list[dict], audio_seconds: float) -> str:
    """The markdown table: each row's time against the first's."""
    lines = ["| LM | lm.bin MiB | width (beam:tokens:threshold) | skip blank | WER | CER | decode s | decode RTF | "
             "time vs first |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["decode_seconds"] / rows[0]["decode_seconds"]
        lines.append(f"| {row['lm']} | {row['lm_mib']:.1f} | {row['width']} | {row['skip_blank']:g} | "
                     f"{row['wer']:.2%} | {row['cer']:.2%} | "
                     f"{row['decode_seconds']:.1f} | {row['decode_seconds'] / audio_seconds:.4f} | {ratio:.1f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder with lm/ (and decoder.json)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--widths", type=Width.parse, nargs="+", required=True, help="BEAM:TOKENS:THRESHOLD ...")
    parser.add_argument("--lms", nargs="+", help="LM folders (asr lm build) to compare (default: the model's lm/)")
    parser.add_argument("--lm-weight", type=float, help="alpha (default: the model's tuned value)")
    parser.add_argument("--word-score", type=float, help="beta (default: the model's tuned value)")
    parser.add_argument("--blank-penalty", type=float, help="blank penalty (default: the model's tuned value)")
    parser.add_argument("--skip-blank", type=float, nargs="+", help="SKIP_BLANK values to compare (1: no skipping; "
                        "default: the search's own)")
    parser.add_argument("--precision", choices=["auto", "int8", "fp32"], default="fp32")
    parser.add_argument("--repeats", type=int, default=1, help="time each width this many passes, keep the fastest")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    model = asr.load_model(args.model, device="cpu", precision=args.precision)
    if model.lm is None and not args.lms:
        sys.exit(f"{args.model}: no lm/ folder; beam search needs a language model (the model's, or --lms)")
    given = {"lm_weight": args.lm_weight, "word_score": args.word_score, "blank_penalty": args.blank_penalty}
    rows, audio_seconds = measure(model, args.manifest, args.widths, args.repeats, args.lms, args.skip_blank,
                                  **{k: v for k, v in given.items() if v is not None})
    machine = describe_machine()
    print(f"{machine_line(machine)}; {args.manifest}: {audio_seconds:.1f} s of audio; "
          f"alpha {rows[0]['lm_weight']}, beta {rows[0]['word_score']}, blank penalty {rows[0]['blank_penalty']}")
    print(table(rows, audio_seconds))
    if args.json:
        write_text_atomically(args.json, json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows,
                                                     "audio_seconds": audio_seconds, "machine": machine}, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
