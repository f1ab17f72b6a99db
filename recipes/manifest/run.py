"""Any corpus given as manifests: DATA/train.jsonl and DATA/dev.jsonl (or .csv), optionally DATA/test.jsonl.

Each line: {"audio_filepath": "...", "duration": 3.2, "text": "..."}; relative paths are relative to the manifest.
CSV files need the header audio_filepath,duration,text.

    python recipes/manifest/run.py --data my_corpus --out exp/my_corpus [--config my.yaml] [key=value ...]
"""

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/driver.py
from driver import recipe_arguments, run_experiment

HERE = Path(__file__).resolve().parent


def find(folder: Path, name: str, required: bool = True) -> Path | None:
    for suffix in (".jsonl", ".json", ".csv"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    if required:
        raise SystemExit(f"{folder}: no {name}.jsonl or {name}.csv manifest")
    return None


def main() -> None:
    args = recipe_arguments(__doc__, "ASR_CORPUS_DIR", "data", HERE.parent / "speechocean762" / "cpu.yaml").parse_args()
    data = Path(args.data)
    test = find(data, "test", required=False)
    run_experiment(args, find(data, "train"), find(data, "dev"), {"test": test} if test else {},
                   command=shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
