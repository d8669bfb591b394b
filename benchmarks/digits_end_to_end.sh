#!/usr/bin/env bash
# Wall-clock of the embedded example as a new user runs it (the README's commands, without the
# install): train digits from nothing (compilation and the final sample grid included), then
# sample 64 digits and the progressive figure, then evaluate (bits/dim on the 300 test digits
# and the digits measure on 256 samples).
# Targets: training at most 5 minutes on a 2-core CPU without GPU (issues 4 and 11); sampling and
# evaluation "in minutes" (issues 5 and 6).
# Usage: bash benchmarks/digits_end_to_end.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-/tmp/ddpm_digits_benchmark}"
rm -rf "$workdir"
for mode in train sample eval; do
  TIMEFORMAT="$mode: %R s"
  time (python main.py --config=configs/digits.py --mode="$mode" --workdir="$workdir" \
    > "$workdir.$mode.log" 2>&1)
done
grep -E "Wrote samples" "$workdir.train.log" | tail -1
grep -E "^Wrote" "$workdir.sample.log"
sed -n '/^metric/,$p' "$workdir.eval.log"
