#!/usr/bin/env bash
# Builds bench/gemv_exp.cu (see its header) with the working tree's NF4 GEMV kernels (cuda/nf4_gemv.cu, cuda/nf4.cu)
# into build/gemv_exp/, outside the torch extension. Then on the GPU machine:
#   build/gemv_exp/gemv_exp ROWS COLS M VARIANT[,VARIANT...] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/gemv_exp
mkdir -p "$out"
NVCC="nvcc -O3 -arch=sm_90a -std=c++17"
$NVCC -I cuda -c cuda/nf4_gemv.cu -o "$out/nf4_gemv.o" &
gemv=$!
$NVCC -I cuda -c cuda/nf4.cu -o "$out/nf4.o" &
core=$!
$NVCC -I cuda -c bench/gemv_exp.cu -o "$out/main.o"
wait "$gemv" && wait "$core"  # a failed compile stops here (a bare `wait` would not)
$NVCC -o "$out/gemv_exp" "$out/main.o" "$out/nf4_gemv.o" "$out/nf4.o"
echo "built $out/gemv_exp"
