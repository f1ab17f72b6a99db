#!/usr/bin/env bash
# The English model on one GPU in under 8 minutes, from a pack of its audio small enough to carry there.
#
#   recipes/english/gpu.sh prepare PACK [--wheels] [--kbps 12] [--max-mib 26] ...   # on the CPU: pack the audio
#   recipes/english/gpu.sh train PACK OUT [key=value ...]                            # on the GPU: train, score
#
# prepare: recipes/english/gpu_pack.py (--help). train: recipes/english/gpu_train.py with gpu.yaml; the run
# (checkpoints, resumed) goes to $EXP (default /tmp/asr-english-gpu), the model with its logs and results to
# OUT (at most 8 files of at most 16 MiB). Python is $PYTHON (default python3); the repository is put on its
# path, and when it lacks soundfile, jiwer or num2words the wheels in PACK/wheels are installed first.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$(cd "$here/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a run cut off at its time limit still shows what it printed
usage() { sed -n '2,10s/^# \{0,1\}//p' "$0" >&2; exit 2; }

[ $# -ge 1 ] || usage
step=$1
shift
case $step in
prepare)
    [ $# -ge 1 ] || usage
    exec "$python" "$here/gpu_pack.py" "$@"
    ;;
train)
    [ $# -ge 2 ] || usage
    pack=$1 out=$2
    shift 2
    exp=${EXP:-/tmp/asr-english-gpu}
    if ! "$python" -c "import soundfile, jiwer, num2words" 2>/dev/null; then
        if ! ls "$pack"/wheels/*.whl >/dev/null 2>&1; then
            echo "error: $python lacks soundfile, jiwer or num2words and $pack/wheels has no wheels" \
                "(gpu.sh prepare PACK --wheels)" >&2
            exit 2
        fi
        "$python" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$exp/site" \
            "$pack"/wheels/*.whl
        export PYTHONPATH="$PYTHONPATH:$exp/site"
    fi
    "$python" "$here/gpu_train.py" --pack "$pack" --out "$out" --exp "$exp" --no-progress "$@"
    echo "gpu.sh train: ${SECONDS} s of wall time"
    ;;
*)
    usage
    ;;
esac
