#!/bin/bash
# `delt eval --random-real --ipc 10` on Fashion-MNIST with the committed teacher, 30 epochs,
# tested every 10, one thread: the code of checkout BEFORE vs AFTER (default: this one), two
# interleaved rounds; with LEAN=1 also AFTER with --channels-last --fold-teacher. Run from the
# repository root with delt on PATH:
#   BEFORE=/path/to/main OUT=/tmp bash benchmarks/eval/end_to_end.sh
T=$(pwd)/benchmarks/quality/paper-b/teacher/teacher.pt
AFTER=${AFTER:-$(pwd)}
runs="${BEFORE:?checkout of main}:default $AFTER:default"
[ -n "$LEAN" ] && runs="$runs $AFTER:lean"
for round in ${ROUNDS:-1 2}; do
for run in $runs; do
  tree=${run%:*}; variant=${run#*:}
  flags=""; [ $variant = lean ] && flags="--channels-last --fold-teacher"
  name=$(basename $tree)-$variant; out=${OUT:-/tmp}/rr-$name-$round; rm -rf $out
  start=$(date +%s.%N)
  PYTHONPATH=$tree/python OMP_NUM_THREADS=1 delt --threads 1 eval --distilled $out --random-real --ipc 10 \
     --teacher $T --data-root /usr/share/datasets/fashion-mnist --epochs 30 --eval-every 10 \
     --no-progress $flags > ${OUT:-/tmp}/rr-$name-$round.log 2>&1
  end=$(date +%s.%N)
  echo "$name round $round: $(echo "$end - $start" | bc) s; load $(cut -d' ' -f1-3 /proc/loadavg)"
  grep "seed 0:" ${OUT:-/tmp}/rr-$name-$round.log | tail -1
done; done
