#!/usr/bin/env bash
# Builds bench/dequant_exp.cu (see its header) into build/dequant_exp/: the working tree's dequantize kernels
# against those of OLD_REV. Usage: bench/dequant_exp.sh [OLD_REV]   (default HEAD), then on the GPU machine
#   build/dequant_exp/dequant_exp [ROWS COLS]   (default 14336 4096)
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-HEAD}
out=build/dequant_exp
mkdir -p "$out/old"
git archive "$rev" cuda | tar -x -C "$out/old"
NVCC="nvcc -O3 -arch=sm_90 -std=c++17"
rename() { echo "-Dintg_dequant=intg_dequant_$1 -Dlowra_dequant=lowra_dequant_$1 -Dlowra_gemv=lowra_gemv_$1"; }
pids=()
$NVCC -I "$out/old/cuda" $(rename old) -c "$out/old/cuda/intg_dequant.cu" -o "$out/intg_old.o" & pids+=($!)
$NVCC -I "$out/old/cuda" $(rename old) -c "$out/old/cuda/lowra.cu" -o "$out/lowra_old.o" & pids+=($!)
$NVCC -I "$out/old/cuda" -Dnf4_dequant=nf4_dequant_old -Dnf4_gemv=nf4_gemv_old -c "$out/old/cuda/nf4.cu" \
  -o "$out/nf4_old.o" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
$NVCC -I cuda $(rename new) -c cuda/intg_dequant.cu -o "$out/intg_new.o" &
$NVCC -I cuda $(rename new) -c cuda/lowra.cu -o "$out/lowra_new.o"
wait
$NVCC -I cuda -o "$out/dequant_exp" bench/dequant_exp.cu "$out"/{intg,lowra}_{old,new}.o "$out/nf4_old.o"
echo "built $out/dequant_exp"
