"""Free Spoken Digit Dataset: train on four speakers, test on the fifth (speaker-disjoint).

    python recipes/fsdd/run.py --out exp/fsdd --beam     # data from $FSDD_DIR or ../shared/data/fsdd

With --extra-kaldi DIR (e.g. ../shared/data/speechocean762/train), the utterances of that Kaldi folder
that contain digit words are added to the training set: many more voices saying digits.
By default 40 espeak-ng voices and every flite voice say each digit --tts-copies times (random speed and
pitch, 8 kHz like FSDD) and join the training set: synthetic voices, never the test speaker
(--tts-voices N sets the number, 0 trains on the four real speakers alone).
"""

import random
import shlex
import sys
from pathlib import Path

from asr.manifest import read_manifest, write_manifest
from asr.train.corpora import DIGIT_WORDS, prepare_fsdd, prepare_kaldi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/driver.py
from asr.text import normalize_text
from asr.tts.engines import available_voices, build_corpus, plan_jobs, require_engines
from driver import recipe_arguments, run_experiment

HERE = Path(__file__).resolve().parent


def synthetic_digits(folder: Path, espeak_voices: int, copies: int, progress: bool) -> list:
    voices = available_voices()
    require_engines(voices)
    espeak = [v for v in voices if v.engine == "espeak-ng"]
    chosen = random.Random(0).sample(espeak, min(espeak_voices, len(espeak)))
    chosen += [v for v in voices if v.engine == "flite"]
    jobs = plan_jobs(DIGIT_WORDS, chosen, copies=copies, seed=0, prefix="digit")
    utts = build_corpus(jobs, folder, folder / "manifest.jsonl", sample_rate=8000, progress=progress)
    print(f"{len(utts)} synthetic utterances from {len(chosen)} voices added")
    return utts


def main() -> None:
    parser = recipe_arguments(__doc__, "FSDD_DIR", str(HERE.parents[1].parent / "shared/data/fsdd"), HERE / "cpu.yaml")
    parser.add_argument("--test-speaker", default="theo", help="speaker held out for the test set")
    parser.add_argument("--extra-kaldi", help="Kaldi data folder whose utterances with digit words join training")
    parser.add_argument("--tts-voices", type=int, default=40,
                        help="espeak-ng voices (besides flite's) saying digits; 0: real speech only")
    parser.add_argument("--tts-copies", type=int, default=3, help="takes of each digit per synthetic voice")
    args = parser.parse_args()
    out = Path(args.out) / "manifests"
    manifests = prepare_fsdd(args.data, out, test_speaker=args.test_speaker)
    extra = []
    if args.extra_kaldi:
        digits = [u for u in read_manifest(prepare_kaldi(args.extra_kaldi, out / "extra_all.jsonl"))
                  if set(normalize_text(u.text).split()) & set(DIGIT_WORDS)]
        print(f"{len(digits)} utterances with digit words added from {args.extra_kaldi}")
        extra += digits
    if args.tts_voices:
        extra += synthetic_digits(Path(args.out) / "synthetic", args.tts_voices, args.tts_copies, not args.no_progress)
    train = manifests["train"]
    if extra:
        train = out / "train_with_extra.jsonl"
        write_manifest(read_manifest(manifests["train"]) + extra, train)
    run_experiment(args, train, manifests["dev"], {f"test-{args.test_speaker}-unseen": manifests["test"]},
                   command=shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
