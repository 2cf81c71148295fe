#!/usr/bin/env bash
# Prints two values of XLA's --xla_cpu_max_isa that differ from this machine's
# own vector ISA, so that CI runs the tests as XLA:CPU compiles them on
# machines of another kind (AVX-512 here -> AVX2 and SSE4_2; AVX2 -> AVX and
# SSE4_2). XLA then vectorises and contracts multiply-adds (FMA) differently.
set -euo pipefail
flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
if [[ " $flags " == *" avx512f "* ]]; then
  echo "AVX2 SSE4_2"
elif [[ " $flags " == *" avx2 "* ]]; then
  echo "AVX SSE4_2"
elif [[ " $flags " == *" avx "* ]]; then
  echo "SSE4_2"
fi  # not x86 (no such flags): nothing to vary, the step is skipped
