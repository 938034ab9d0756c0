// Host-side interface of the lowbitpack CUDA kernels. Pure C++ + CUDA runtime: no torch headers, so
// every .cu file compiles with a bare `nvcc -c` (tests/test_cuda_compile.py does that in CI) and the
// torch binding lives apart in bindings.cpp.
//
// Each launcher returns the CUDA error of its launch (cudaSuccess when fine). Tensors are plain device
// pointers; layouts and the exact arithmetic are those of the pure-torch references in
// lowbitpack/layouts/*.py, which are the ground truth.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lowbit {

// Element types of float tensors crossing the boundary.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// intg-v1: qweight uint8 [rows, row_bytes] (LSB-first bit stream per row), scale [rows, n_groups],
// zero uint8 [rows, n_groups] (w = (q - z) * s) or offset float [rows, n_groups] (w = q * s + m),
// optional g_idx int32 [cols].
struct IntgParams {
  const uint8_t* qweight;
  int64_t row_bytes;
  const void* scale;
  int scale_dtype;
  const uint8_t* zero;    // nullptr in offset mode
  const void* offset;     // nullptr in zero mode
  int offset_dtype;
  const int32_t* g_idx;   // nullptr: group = col / group_size
  int64_t n_groups;
  int64_t group_size;
  int64_t rows;
  int64_t cols;
  int bits;               // 1..8 (GEMV: 2, 3, 4, 8)
};

// nf4-bnb-v1: bitsandbytes' 4-bit bytes, flat over the row-major [rows, cols] tensor, two codes a byte,
// high nibble = even element. absmax is either fp32 per block, or double-quantized:
// absmax[b] = nested_map[absmax_code[b]] * nested_absmax[b / nested_blocksize] + offset (fp32, in that order).
struct Nf4Params {
  const uint8_t* packed;
  const float* quant_map;      // 16 fp32 levels
  int64_t blocksize;
  const float* absmax;         // fp32 [n_blocks], or nullptr when nested
  const uint8_t* absmax_code;  // uint8 [n_blocks] (nested)
  const float* nested_map;     // fp32 [256]
  const float* nested_absmax;  // fp32 [ceil(n_blocks / nested_blocksize)]
  int64_t nested_blocksize;
  float offset;                // fp32 (by value: no device scalar to keep in sync)
  int64_t rows;
  int64_t cols;
};

// lowra-v1 (lowbitpack/layouts/lowra.py): rows grouped by width b in {1, 2, 4}; class b holds codes
// uint8 [n_b, ceil(cols*b/8)] (LSB-first bit stream per row), an fp16 codebook [n_b, 2^b], and rows_map
// int32 [n_b]: the original row of each class row. w[rows_map[i], j] = codebook[i, code[i, j]].
struct LowraClass {
  const uint8_t* codes;
  const uint16_t* codebook;  // fp16 bits
  const int32_t* rows_map;
  int64_t n;                 // rows in this class (may be 0)
};
struct LowraParams {
  LowraClass cls[3];         // widths 1, 2, 4
  int64_t rows;              // all rows (output stride)
  int64_t cols;
};

cudaError_t intg_dequant(const IntgParams& p, void* out, int out_dtype, cudaStream_t stream);
cudaError_t nf4_dequant(const Nf4Params& p, void* out, int out_dtype, cudaStream_t stream);
cudaError_t lowra_dequant(const LowraParams& p, void* out, int out_dtype, cudaStream_t stream);

// Fused dequant-GEMV: y[m, rows] = x[m, cols] @ W^T for 1 <= m <= 8, x and y bf16 or fp16 (x_dtype).
// Each weight is dequantized exactly like the reference (fp32, one rounding to x's dtype), so the result
// equals dequantize(W, x.dtype) @ x^T up to the order of the fp32 sums (tensor-core mma, fp32 accumulate).
cudaError_t intg_gemv(const IntgParams& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream);
cudaError_t nf4_gemv(const Nf4Params& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream);
cudaError_t lowra_gemv(const LowraParams& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream);

// NF4 pair-table GEMV (nf4_gemv.cu; stream-K, one-block-per-tile or ring form) for whole 128-column iterations:
// cols % 128 == 0, power-of-two blocksize >= 64, aligned storage. It factors absmax out of each 64-column
// sub-block, so each weight enters as quant_map[q] rounded to x's dtype (times the fp32 absmax after the
// fp32 block sum) instead of r(quant_map[q] * absmax): same precision, not the same bits as
// dequantize-then-matmul. nf4_gemv_plan says whether it applies (and which form) and what the caller must
// provide when partial_floats > 0 (stream-K): `partial_floats` floats of scratch (any contents) and
// `n_tiles` int counters that are zero before the first call; every call leaves them zero again, so one
// counter buffer serves all calls on a stream. The tile and ring forms take null for both.
enum Nf4GemvForm : int {
  kNf4StreamK = 0,  // persistent stream-K over warp groups (needs the scratch below)
  kNf4Tile = 1,     // one block per 16-row tile
  kNf4Ring = 2,     // persistent, whole tiles per block, codes streamed by a bulk-copy producer warp (sm_90+)
};
struct Nf4GemvPlan {
  bool ok;
  int form;   // Nf4GemvForm
  int blocks;
  int warps;  // per block (consumer warps: the ring form adds its producer warp)
  int group;  // warps that work on one tile together
  int pf;     // iterations (ring: absmax fetches, in stages) each warp keeps in flight
  int stages; // ring form: shared-memory stages
  bool row_copies;  // ring form: one bulk copy per row instead of one tensor copy per stage
  int per_sm;       // ring form: blocks per SM
  bool tile_absmax; // ring form: a tile's absmax codes come through shared memory (nested absmax)
  int amax_warps;   // ring form: absmax warps that compute each stage's fp32 absmax (helper warps a block)
  bool pdl;         // ring form: launched with programmatic dependent launch
  bool x_smem;  // x is staged in shared memory
  int64_t n_tiles;
  int64_t partial_floats;
};
Nf4GemvPlan nf4_gemv_plan(const Nf4Params& p, int64_t m, int x_dtype, const void* x);
cudaError_t nf4_gemv_sk(const Nf4Params& p, const Nf4GemvPlan& plan, const void* x, int64_t m, int x_dtype, void* y,
                        float* partials, int* counters, cudaStream_t stream);

}  // namespace lowbit
