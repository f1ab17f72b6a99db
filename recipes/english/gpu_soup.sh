#!/usr/bin/env bash
# Four fine-tunings of the shipped model at once on one GPU: the ingredients of a weight soup (README.md, stage 12).
#
#   recipes/english/gpu_soup.sh PACK OUTDIR MINUTES [key=value ...]
#
# Each run is `gpu.sh train PACK` from asr/default_model for train.max_minutes=MINUTES with 3 loader workers, with
# its own seed, learning rate and augmentation (RUNS below), then the key=value overrides given here. Each run's OUT
# and its log go into OUTDIR/NAME.tar (about 6 MiB, one file as a device run's $OUT brings them back); its run
# folder is $SOUP_TMP/soup-NAME (default /tmp). SOUP_RUNS="ft8 ftlow" runs only those. With nvidia-smi,
# OUTDIR/gpu.csv samples the GPU every 15 s. Exit status 1 when any run failed (every run's tar is still written).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 3 ] || { sed -n '2,10s/^# \{0,1\}//p' "$0" >&2; exit 2; }
pack=$1 outdir=$2 minutes=$3
shift 3
tmp=${SOUP_TMP:-/tmp}
mkdir -p "$outdir" "$tmp"

S='data.speed_perturb=[0.8,0.9,1.0,1.1,1.2]'
declare -A RUNS=(
    [ft8]="train.lr=8e-4 train.seed=1"
    [ftwarp]="train.lr=8e-4 train.seed=2 $S model.features.vtlp_warp=[0.9,1.1]"
    [ftreg]="train.lr=1e-3 train.seed=3 $S model.dropout=0.3 data.noise_snr_db=[10,40] data.noise_prob=0.3 data.reverb_prob=0.2"
    [ftlow]="train.lr=5e-4 train.seed=4 data.max_batch_seconds=200 train.ema_decay=0.999"
)
names=${SOUP_RUNS:-ft8 ftwarp ftreg ftlow}
for name in $names; do
    [ -n "${RUNS[$name]:-}" ] || { echo "error: SOUP_RUNS: no run named '$name' (${!RUNS[*]})" >&2; exit 2; }
done

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$outdir/gpu.csv" &
    smi=$!
fi
declare -A pids
for name in $names; do
    # shellcheck disable=SC2086  # RUNS' values are lists of overrides
    EXP=$tmp/soup-$name "$here/gpu.sh" train "$pack" "$tmp/soup-out-$name" \
        train.init_from="$here/../../asr/default_model" train.warmup_steps=100 train.max_minutes="$minutes" \
        data.num_workers=3 ${RUNS[$name]} "$@" > "$tmp/soup-$name.log" 2>&1 &
    pids[$name]=$!
done
status=0
for name in $names; do
    if wait "${pids[$name]}"; then
        echo "$name: $(grep '^dev WER' "$tmp/soup-$name.log" | tail -n 1)"
    else
        echo "$name: failed (exit $?): $(tail -n 1 "$tmp/soup-$name.log")"
        status=1
    fi
    mkdir -p "$tmp/soup-out-$name"
    cp "$tmp/soup-$name.log" "$tmp/soup-out-$name/run.log"
    tar -cf "$outdir/$name.tar" -C "$tmp" "soup-out-$name"
done
[ -z "${smi:-}" ] || kill "$smi"
exit $status
