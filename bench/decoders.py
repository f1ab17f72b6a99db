"""The same posteriors decoded three ways: greedy, our beam search (torchaudio / flashlight) and pyctcdecode.

    pip install -e ".[bench]"      # pyctcdecode and the kenlm Python binding (built from source)
    python bench/decoders.py --model exp/so762/best --lm exp/lm/en4 --manifest data/so762/dev.jsonl

Both beam decoders get the same KenLM model, beam size, LM weight (alpha) and word score (beta);
pyctcdecode also gets the LM's vocabulary as its unigram list. Prints WER/CER and decode time of
each (the fastest of --repeats passes over all utterances), and the time ratio, from one run; names
the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import asr
from asr.audio import load_audio
from asr.device import describe_machine, machine_line
from asr.files import write_text_atomically
from asr.lm.language_model import LanguageModel
from asr.manifest import read_manifest
from asr.metrics import error_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lm", required=True, help="LM folder (asr lm build)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--beam-size", type=int, default=50)
    parser.add_argument("--lm-weight", type=float, help="alpha (default: the model's tuned value)")
    parser.add_argument("--word-score", type=float, help="beta (default: the model's tuned value)")
    parser.add_argument("--beam-threshold", type=float, help="ours: prune hypotheses this far below the best")
    parser.add_argument("--beam-size-token", type=int, help="ours: tokens tried per frame")
    parser.add_argument("--limit", type=int, help="first N utterances only")
    parser.add_argument("--repeats", type=int, default=3, help="time each decoder this many passes, keep the fastest")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    try:
        from pyctcdecode import build_ctcdecoder
    except ImportError:
        sys.exit("bench/decoders.py needs pyctcdecode and kenlm: pip install -e '.[bench]'")

    model = asr.load_model(args.model, device="cpu", lm=args.lm)
    lm = LanguageModel.load(args.lm)
    utts = read_manifest(args.manifest)[: args.limit]
    refs = [u.text for u in utts]
    posteriors = model.posteriors([load_audio(u.audio_filepath) for u in utts])
    given = {"lm_weight": args.lm_weight, "word_score": args.word_score, "beam_threshold": args.beam_threshold,
             "beam_size_token": args.beam_size_token}
    _, opts = model.options(decoder="beam", beam_size=args.beam_size, lexicon=True, hotwords=[],
                            **{k: v for k, v in given.items() if v is not None})
    machine = describe_machine()
    print(f"{machine_line(machine)}; {len(utts)} utterances, "
          f"{sum(len(p) for p in posteriors)} frames; beam {opts.beam_size}, alpha {opts.lm_weight}, "
          f"beta {opts.word_score}", flush=True)

    ours, greedy = model.decoder(opts), model.decoder(model.options(decoder="greedy")[1])
    chars = model.columns("beam")  # a model with word pieces searches beams over its characters
    labels = ["" if i == model.vocab.blank else t for i, t in enumerate(model.vocab.tokens)]
    # flashlight weighs KenLM's log10 probability; pyctcdecode weighs its natural log: same weighting
    theirs = build_ctcdecoder(labels, kenlm_model_path=str(lm.binary), unigrams=lm.words,
                              alpha=opts.lm_weight / 2.302585, beta=opts.word_score)

    def run(name, decode):
        seconds = float("inf")
        for _ in range(max(1, args.repeats)):  # the fastest pass: the least disturbed by anything else running
            start = time.perf_counter()
            hyps = [decode(lp) for lp in posteriors]
            seconds = min(seconds, time.perf_counter() - start)
        rates = error_rates(refs, hyps)
        print(f"{name:28s} WER {rates.wer:7.2%}  CER {rates.cer:7.2%}  {seconds:8.2f} s", flush=True)
        return {"wer": rates.wer, "cer": rates.cer, "seconds": seconds}

    results = {
        "greedy": run("greedy", lambda lp: greedy.decode(lp[None, :, model.columns("greedy")], torch.tensor([len(lp)]),
                                                         model.frame_seconds)[0].text),
        "ours (torchaudio/flashlight)": run("ours (torchaudio/flashlight)", lambda lp: ours.decode(
            lp[None, :, chars], torch.tensor([len(lp)]), model.frame_seconds)[0].text),
        "pyctcdecode": run("pyctcdecode", lambda lp: theirs.decode(lp[:, chars].numpy(), beam_width=opts.beam_size)),
    }
    ratio = results["pyctcdecode"]["seconds"] / results["ours (torchaudio/flashlight)"]["seconds"]
    print(f"ours is {ratio:.1f}x faster than pyctcdecode")
    if args.json:
        write_text_atomically(args.json, json.dumps({"command": " ".join(["python", *sys.argv]), "results": results,
                                                     "speed_ratio": ratio, "machine": machine}, indent=2))


if __name__ == "__main__":
    main()
