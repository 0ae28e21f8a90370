#!/bin/bash
# CPU tables of benchmarks/README.md (issue 14), one process per configuration, run back to back.
# TABLES=0 skips the per-method tables, TARGET=0 the target check; OUT=DIR writes elsewhere.
set -e
OUT=${OUT:-benchmarks/synthesis}
# The glibc heap pinned as in benchmarks/conftest.py: every row runs on warm memory.
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
ROWS=reference,floor,delt,+channels_last,+per-sample-aug
run() { local name=$1; shift; .venv/bin/delt bench synthesis --threads 1 --no-progress --json $OUT/$name.json "$@" | tee $OUT/$name.md; }
# The CPU target of issue 14 (fp32, ResNet-18-small 32 px, batch 100): more repeats, three rows.
if [ "${TARGET:-1}" = 1 ]; then
  for m in cda delt; do
    it=2; [ $m = delt ] && it=8
    run target-resnet18_small-32px-$m --repeats 5 --rows reference,floor,delt --method $m \
      --arch resnet18_small --resolution 32 --iterations $it
  done
fi
if [ "${TABLES:-1}" = 1 ]; then
  # The cheapest configurations first.
  for config in "convnet3-28px --arch convnet3 --resolution 28 --channels 1" \
      "resnet18-64px-b32 --arch resnet18 --resolution 64 --batch-size 32" \
      "resnet18_small-32px --arch resnet18_small --resolution 32"; do
    set -- $config; prefix=$1; shift
    for m in sre2l cda delt; do
      it=2; [ $m = delt ] && it=8
      run $prefix-$m --repeats 2 --rows $ROWS --method $m --iterations $it "$@"
    done
  done
fi
