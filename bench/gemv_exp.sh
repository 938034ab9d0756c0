#!/usr/bin/env bash
# Builds bench/gemv_exp.cu (see its header) with the working tree's NF4 GEMV kernels (cuda/nf4_gemv.cu, cuda/nf4.cu)
# into build/gemv_exp/, outside the torch extension. Then on the GPU machine:
#   build/gemv_exp/gemv_exp ROWS COLS M VARIANT[,VARIANT...] [REPS]
# `bash bench/gemv_exp.sh trace` builds build/gemv_trace/gemv_exp, which also prints where each ring launch's time
# went (per-block clocks; cuda/nf4_gemv.cu LOWBIT_RING_TRACE).
set -euo pipefail
cd "$(dirname "$0")/.."
# GEMV_EXP_ARCH (default sm_90a) picks the target, e.g. sm_90 as the torch extension builds it (its own build folder).
arch=${GEMV_EXP_ARCH:-sm_90a}
out=build/gemv_exp
[ "$arch" = sm_90a ] || out=build/gemv_exp_$arch
# GEMV_EXP_FLAGS adds nvcc flags, e.g. the torch extension's (-lineinfo -D__CUDA_NO_HALF_OPERATORS__ ...), into
# build/gemv_exp_flags.
[ -z "${GEMV_EXP_FLAGS:-}" ] || out=build/gemv_exp_flags
NVCC="nvcc -O3 -arch=$arch -std=c++17 ${GEMV_EXP_FLAGS:-}"
if [ "${1:-}" = trace ]; then  # per-block clocks of each ring launch, printed after its timing (slower)
  out=build/gemv_trace
  NVCC="$NVCC -DLOWBIT_RING_TRACE"
fi
mkdir -p "$out"
$NVCC -I cuda -c cuda/nf4_gemv.cu -o "$out/nf4_gemv.o" &
gemv=$!
$NVCC -I cuda -c cuda/nf4.cu -o "$out/nf4.o" &
core=$!
$NVCC -I cuda -c bench/gemv_exp.cu -o "$out/main.o"
wait "$gemv" && wait "$core"  # a failed compile stops here (a bare `wait` would not)
$NVCC -o "$out/gemv_exp" "$out/main.o" "$out/nf4_gemv.o" "$out/nf4.o"
echo "built $out/gemv_exp"
