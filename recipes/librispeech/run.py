"""LibriSpeech from a local copy in the standard layout (LibriSpeech/<split>/speaker/chapter/*.flac + *.trans.txt).

    python recipes/librispeech/run.py --data /path/to/LibriSpeech --out exp/librispeech
    python recipes/librispeech/run.py --data ... --out ... --train-sets train-clean-100   # a smaller start
No download happens here: get the archives from OpenSLR (resource 12) and unpack them first.
"""

import shlex
import sys
from pathlib import Path

from asr.manifest import read_manifest, write_manifest
from asr.train.corpora import CorpusError, prepare_librispeech

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/driver.py
from driver import recipe_arguments, run_experiment

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = recipe_arguments(__doc__, "LIBRISPEECH_DIR", "LibriSpeech", HERE / "ds2.yaml")
    parser.add_argument("--train-sets", default="train-clean-100,train-clean-360,train-other-500",
                        help="comma-separated training splits")
    parser.add_argument("--dev-set", default="dev-clean", help="split that picks the best checkpoint")
    parser.add_argument("--test-sets", default="test-clean,test-other", help="comma-separated test splits")
    args = parser.parse_args()
    args.train_sets = [s for s in args.train_sets.split(",") if s]
    args.test_sets = [s for s in args.test_sets.split(",") if s]
    root, manifests = Path(args.data), Path(args.out) / "manifests"
    if not root.is_dir():
        raise SystemExit(f"{root}: LibriSpeech folder not found. Download and unpack it (OpenSLR resource 12), "
                         "then pass --data /path/to/LibriSpeech or set $LIBRISPEECH_DIR.")
    try:
        prepared = {s: prepare_librispeech(root / s, manifests / f"{s}.jsonl")
                    for s in {*args.train_sets, args.dev_set, *args.test_sets}}
    except CorpusError as e:
        raise SystemExit(f"error: {e}") from None
    train = manifests / "train.jsonl"
    write_manifest([u for s in args.train_sets for u in read_manifest(prepared[s])], train)
    run_experiment(args, train, prepared[args.dev_set], {s: prepared[s] for s in args.test_sets},
                   command=shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
