#!/bin/bash
# Paired accuracy of `delt eval --random-real` on Fashion-MNIST with the committed teacher:
# default flags vs the lean step (--channels-last --fold-teacher), seed by seed (the same
# seed draws the same random-real set in both), one thread, tested once at the end.
# Run from the repository root with delt on PATH:
#   IPC=10 EPOCHS=100 SEEDS="0 1 2" OUT=/tmp/paired bash benchmarks/eval/paired_lean.sh
T=$(pwd)/benchmarks/quality/paper-b/teacher/teacher.pt
IPC=${IPC:-10}; EPOCHS=${EPOCHS:-300}; OUT=${OUT:-/tmp/paired}
mkdir -p $OUT
for seed in ${SEEDS:-0 1 2}; do
for variant in default lean; do
  flags=""; [ $variant = lean ] && flags="--channels-last --fold-teacher"
  dir=$OUT/ipc$IPC-$variant-seed$seed; rm -rf $dir
  start=$(date +%s.%N)
  OMP_NUM_THREADS=1 delt --threads 1 eval --distilled $dir --random-real --ipc $IPC --seeds $seed \
    --teacher $T --data-root /usr/share/datasets/fashion-mnist --epochs $EPOCHS \
    --eval-every $EPOCHS --no-progress $flags > $dir.log 2>&1
  end=$(date +%s.%N)
  echo "ipc $IPC $variant seed $seed: $(echo "$end - $start" | bc) s; load $(cut -d' ' -f1-3 /proc/loadavg);" \
    "$(grep "seed $seed:" $dir.log | tail -1)"
done; done
