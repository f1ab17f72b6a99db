"""speechocean762: non-native read English in Kaldi-style folders {train,dev}; dev speakers are unseen.

    python recipes/speechocean762/run.py --out exp/so762                       # CPU configuration
    python recipes/speechocean762/run.py --out exp/so762-gpu --config recipes/speechocean762/gpu.yaml
Data from --data, $SPEECHOCEAN762_DIR or ../shared/data/speechocean762.
"""

import shlex
import sys
from pathlib import Path

from asr.train.corpora import prepare_kaldi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/driver.py
from driver import recipe_arguments, run_experiment

HERE = Path(__file__).resolve().parent


def main() -> None:
    default = str(HERE.parents[1].parent / "shared/data/speechocean762")
    args = recipe_arguments(__doc__, "SPEECHOCEAN762_DIR", default, HERE / "cpu.yaml").parse_args()
    manifests = Path(args.out) / "manifests"
    train = prepare_kaldi(Path(args.data) / "train", manifests / "train.jsonl")
    dev = prepare_kaldi(Path(args.data) / "dev", manifests / "dev.jsonl")
    run_experiment(args, train, dev, {}, command=shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
