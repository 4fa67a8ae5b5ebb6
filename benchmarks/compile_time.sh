#!/usr/bin/env bash
# Times the compilation of a typical consumer translation unit (benchmarks/compile_time/
# consumer.cpp: one pipeline over libcurl) with the release flags, `runs` times per compiler, and
# prints the median user CPU seconds (steady on a busy machine) and wall seconds. Not part of the
# build or of CI; the release build compiles the TU once so that it keeps compiling.
#
#     benchmarks/compile_time.sh [runs] [include directory of the weir to time]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
include=${2:-include}
source=benchmarks/compile_time/consumer.cpp
object=$(mktemp --suffix=.o)
times=$(mktemp)
trap 'rm -f "$object" "$times"' EXIT

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

for compiler in g++ clang++-14; do
  command -v "$compiler" >/dev/null || { echo "$compiler: not found"; continue; }
  : >"$times"
  for _ in $(seq "$runs"); do
    /usr/bin/time -a -o "$times" -f '%U %e' \
      "$compiler" -std=c++20 -O2 -I"$include" -c "$source" -o "$object"
  done
  user=$(cut -d' ' -f1 "$times" | median)
  wall=$(cut -d' ' -f2 "$times" | median)
  echo "$compiler -O2: user ${user} s, wall ${wall} s (median of $runs), $(size -d "$object" |
    awk 'NR == 2 { print $1 }') bytes of code"
done
