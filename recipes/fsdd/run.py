"""Free Spoken Digit Dataset: train on four speakers, test on the fifth (speaker-disjoint).

    python recipes/fsdd/run.py --out exp/fsdd            # data from $FSDD_DIR or ../shared/data/fsdd

With --extra-kaldi DIR (e.g. ../shared/data/speechocean762/train), the utterances of that Kaldi folder
that contain digit words are added to the training set: many more voices saying digits.
"""

import shlex
import sys
from pathlib import Path

from asr.corpora import DIGIT_WORDS, prepare_fsdd, prepare_kaldi
from asr.data import read_manifest, write_manifest
from asr.recipe import recipe_arguments, run_experiment
from asr.text import normalize_text

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = recipe_arguments(__doc__, "FSDD_DIR", str(HERE.parents[1].parent / "shared/data/fsdd"), HERE / "cpu.yaml")
    parser.add_argument("--test-speaker", default="theo", help="speaker held out for the test set")
    parser.add_argument("--extra-kaldi", help="Kaldi data folder whose utterances with digit words join training")
    args = parser.parse_args()
    out = Path(args.out) / "manifests"
    manifests = prepare_fsdd(args.data, out, test_speaker=args.test_speaker)
    train = manifests["train"]
    if args.extra_kaldi:
        extra = [u for u in read_manifest(prepare_kaldi(args.extra_kaldi, out / "extra_all.jsonl"))
                 if set(normalize_text(u.text).split()) & set(DIGIT_WORDS)]
        train = out / "train_with_extra.jsonl"
        write_manifest(read_manifest(manifests["train"]) + extra, train)
        print(f"{len(extra)} utterances with digit words added from {args.extra_kaldi}")
    run_experiment(args, train, manifests["dev"], {f"test-{args.test_speaker}-unseen": manifests["test"]},
                   command=shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
