#!/bin/bash
# `delt eval --random-real --ipc 10` on Fashion-MNIST with the committed teacher, 30 epochs,
# tested every 10, one thread: the code of checkout BEFORE vs AFTER (default: this one), two
# interleaved rounds. Run from the repository root with delt on PATH:
#   BEFORE=/path/to/main OUT=/tmp bash benchmarks/eval/end_to_end.sh
T=$(pwd)/benchmarks/quality/paper-b/teacher/teacher.pt
for round in 1 2; do
for tree in ${BEFORE:?checkout of main} ${AFTER:-$(pwd)}; do
  name=$(basename $tree); out=${OUT:-/tmp}/rr-$name-$round; rm -rf $out
  start=$(date +%s.%N)
  PYTHONPATH=$tree/python OMP_NUM_THREADS=1 delt --threads 1 eval --distilled $out --random-real --ipc 10 \
     --teacher $T --data-root /usr/share/datasets/fashion-mnist --epochs 30 --eval-every 10 --no-progress > ${OUT:-/tmp}/rr-$name-$round.log 2>&1
  end=$(date +%s.%N)
  echo "$name round $round: $(echo "$end - $start" | bc) s; load $(cut -d' ' -f1-3 /proc/loadavg)"
  grep "seed 0:" ${OUT:-/tmp}/rr-$name-$round.log | tail -1
done; done
