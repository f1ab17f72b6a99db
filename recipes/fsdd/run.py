"""Free Spoken Digit Dataset: train on four speakers, test on the fifth (speaker-disjoint).

    python recipes/fsdd/run.py --out exp/fsdd            # data from $FSDD_DIR or ../shared/data/fsdd
"""

import shlex
import sys
from pathlib import Path

from asr.corpora import prepare_fsdd
from asr.recipe import recipe_arguments, run_experiment

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = recipe_arguments(__doc__, "FSDD_DIR", str(HERE.parents[1].parent / "shared/data/fsdd"), HERE / "cpu.yaml")
    parser.add_argument("--test-speaker", default="theo", help="speaker held out for the test set")
    args = parser.parse_args()
    manifests = prepare_fsdd(args.data, Path(args.out) / "manifests", test_speaker=args.test_speaker)
    run_experiment(args, manifests["train"], manifests["dev"], {f"test-{args.test_speaker}-unseen": manifests["test"]},
                   command=shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
