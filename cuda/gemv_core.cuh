// Fused dequant-GEMV core shared by all layouts: y[m, rows] = x[m, cols] @ W^T, 1 <= m <= 8.
//
// Why tensor cores for a GEMV: dequantizing on CUDA cores and then doing m FMAs per weight makes the
// kernel instruction-bound long before it is memory-bound (~8 instructions per weight at m = 1, ~25 at
// m = 8). With mma.m16n8k16 the m rows of x ride along as the n = 8 columns of B for free, and each
// weight costs only its decode plus half a pack instruction.
//
// Tiling: a block owns 16 output rows; its WARPS warps split the input dimension (split-K) and reduce
// through shared memory at the end. Per iteration a warp covers 128 input columns: lane = 4*g + t reads
// the 32 consecutive codes [col0, col0 + 32) with col0 = it*128 + 32*t of rows g and g + 8 (one 16-byte
// load per row for 4-bit), i.e. 16 rows x 64 contiguous bytes per warp.
//
// The k order inside an mma is free as long as A and B agree, so the k slots of lane t
// ({2t, 2t+1, 2t+8, 2t+9}) are mapped to ITS OWN four consecutive columns col0 + 4j + {0,1,2,3} in mma j
// (j = 0..7). All lanes with the same t use the same columns, which is what the fragment layout requires,
// and the B fragment is then just x's own consecutive pairs: no shuffles, no shared memory staging.
//
// Latency: everything a chunk needs from global memory (codes, and the raw bits of its scale / absmax
// code) is fetched kPrefetch iterations ahead into rotating register buffers; the
// dependent arithmetic (shared-memory lookups, conversions) waits until the data is there. Without
// that, the chain "load absmax code -> look up -> multiply" costs a full DRAM latency per iteration.
//
// Decoder contract (one per layout):
//   kWords             u32 words of raw codes per row per 32-code chunk
//   kSmemFloats        floats of shared memory the decoder wants (LUTs); prologue(smem, tile) fills them
//   out_rows(), out_row(r)  y's row stride and the y row of decoder row r (LowRA: rows are permuted)
//   rows(), cols()     __host__ __device__: the launcher sizes the grid with rows() (a __device__-only
//                      member called from host code compiles to exit(1) without a diagnostic)
//   fast_ok(col_end)   columns [.., col_end) are in bounds and may be read with aligned vector loads
//                      (asked per warp iteration, so the fast/slow branch is warp-uniform and the
//                      warp-collective mma can sit inside it)
//   Raw                the raw words of a chunk (member w[kWords]) plus raw per-chunk parameters
//   fetch(row, col0, raw)                                issue the chunk's global loads (fast path)
//   State state(raw, row, col0, smem)                    per-(row, chunk) parameters from the raw bits
//   decode4(w, st, j, row, col0, smem, out[4])           fast path: columns col0 + 4j .. +3, fp32
//   value_slow(row, col, smem)                           any column < cols, byte loads, any alignment
// Both paths compute exactly the reference's fp32 value.
#pragma once

#include "common.cuh"

namespace lowbit {

// x[g, col0 .. col0 + 32) as 16 packed pairs; lanes whose g >= m hold zeros (their B columns are unused).
template <typename XT>
__device__ __forceinline__ void load_x32(const XT* __restrict__ xr, int64_t col0, bool active, bool vec,
                                         uint32_t (&xv)[16]) {
  if (!active) {
#pragma unroll
    for (int i = 0; i < 16; ++i) xv[i] = 0u;
  } else if (vec) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint4 v = __ldg(reinterpret_cast<const uint4*>(xr + col0) + i);
      xv[4 * i] = v.x; xv[4 * i + 1] = v.y; xv[4 * i + 2] = v.z; xv[4 * i + 3] = v.w;
    }
  } else {
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(xr) + col0;
#pragma unroll
    for (int i = 0; i < 16; ++i) xv[i] = static_cast<uint32_t>(xs[2 * i]) | (static_cast<uint32_t>(xs[2 * i + 1]) << 16);
  }
}

template <class Dec>
struct ChunkBuf {
  typename Dec::Raw r0, r1;  // rows g and g + 8
};

// How many iterations ahead a warp fetches. Measured on H100 (bench/kernels.py): with one iteration in
// flight the GEMV ran at ~1.2 TB/s whatever the bit width -- latency-bound, not byte- or instruction-bound
// -- so each warp keeps two iterations of codes in flight.
constexpr int kPrefetch = 2;

template <class Dec, typename XT>
struct TileCtx {
  const Dec& dec;
  const XT* __restrict__ xr;
  int64_t r0, r1, n_it, cols;
  int t;
  bool x_active, x_vec;
  float* smem;

  __device__ __forceinline__ bool fast(int64_t it) const { return it < n_it && dec.fast_ok(it * 128 + 128); }
  __device__ __forceinline__ void fetch(int64_t it, ChunkBuf<Dec>& b) const {
    const int64_t col0 = it * 128 + 32 * t;
    dec.fetch(r0, col0, b.r0);
    dec.fetch(r1, col0, b.r1);
  }
};

// One warp iteration on chunk `it` (its codes in `cur` when fast), first issuing the fetch of iteration
// `it + kPrefetch * WARPS` into `ahead` (the buffer the previous step consumed).
template <class Dec, typename XT, int WARPS>
__device__ __forceinline__ void gemv_step(const TileCtx<Dec, XT>& c, int64_t it, ChunkBuf<Dec>& cur,
                                          ChunkBuf<Dec>& ahead, float (&acc)[4]) {
  const int64_t col0 = it * 128 + 32 * c.t;
  const int64_t it_ahead = it + kPrefetch * WARPS;
  if (c.fast(it_ahead)) c.fetch(it_ahead, ahead);
  if (c.fast(it)) {
    uint32_t xv[16];  // x is small and cache-resident: loaded here, not prefetched (saves 16 registers a buffer)
    load_x32<XT>(c.xr, col0, c.x_active, c.x_vec, xv);
    const typename Dec::State s0 = c.dec.state(cur.r0, c.r0, col0, c.smem);
    const typename Dec::State s1 = c.dec.state(cur.r1, c.r1, col0, c.smem);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float a[4], b[4];
      c.dec.decode4(cur.r0.w, s0, j, c.r0, col0, c.smem, a);
      c.dec.decode4(cur.r1.w, s1, j, c.r1, col0, c.smem, b);
      // Round each weight to x's dtype exactly as dequantize(W, x.dtype) would; the mma multiplies
      // exactly and accumulates in fp32.
      mma16816<XT>(acc, Cvt<XT>::pack2(a[0], a[1]), Cvt<XT>::pack2(b[0], b[1]), Cvt<XT>::pack2(a[2], a[3]),
                   Cvt<XT>::pack2(b[2], b[3]), xv[2 * j], xv[2 * j + 1]);
    }
  } else {
    // Tail or unaligned shapes: element by element, zero past the end (x is zero there too).
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(c.xr);
#pragma unroll 1
    for (int j = 0; j < 8; ++j) {
      float a[4], b[4];
      uint32_t xb[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t col = col0 + 4 * j + k;
        const bool in = col < c.cols;
        a[k] = in ? c.dec.value_slow(c.r0, col, c.smem) : 0.f;
        b[k] = in ? c.dec.value_slow(c.r1, col, c.smem) : 0.f;
        xb[k] = (in && c.x_active) ? xs[col] : 0u;
      }
      mma16816<XT>(acc, Cvt<XT>::pack2(a[0], a[1]), Cvt<XT>::pack2(b[0], b[1]), Cvt<XT>::pack2(a[2], a[3]),
                   Cvt<XT>::pack2(b[2], b[3]), xb[0] | (xb[1] << 16), xb[2] | (xb[3] << 16));
    }
  }
}

// One block's tile: output rows [16*tile, 16*tile + 16) of `dec`. Shared memory comes from the caller so
// that one kernel can run tiles of several decoders (LowRA's width classes).
template <class Dec, typename XT, int WARPS>
__device__ __forceinline__ void gemv_tile(const Dec& dec, const XT* __restrict__ x, int m, XT* __restrict__ y,
                                          bool x_vec, int64_t tile, float (*red)[16][9], float* dec_smem) {
  static_assert(sizeof(decltype(Dec::Raw::w)) == Dec::kWords * sizeof(uint32_t), "Raw::w holds kWords words");
  dec.prologue(dec_smem, tile);
  __syncthreads();

  const int64_t rows = dec.rows();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t row_base = tile * 16;
  const bool x_active = g < m;
  // Rows past the end are clamped (in-bounds reads) and never stored.
  const TileCtx<Dec, XT> c{dec, x + static_cast<int64_t>(x_active ? g : 0) * dec.cols(),
                           min(row_base + g, rows - 1), min(row_base + g + 8, rows - 1),
                           (dec.cols() + 127) / 128, dec.cols(), t, x_active, x_vec, dec_smem};

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  // Three rotating buffers (kPrefetch + 1), the loop unrolled by three so they never need copying.
  static_assert(kPrefetch == 2, "the rotation below is written for two iterations in flight");
  ChunkBuf<Dec> A, B, C;
  if (c.fast(warp)) c.fetch(warp, A);
  if (c.fast(warp + WARPS)) c.fetch(warp + WARPS, B);
  for (int64_t it = warp; it < c.n_it; it += 3 * WARPS) {
    gemv_step<Dec, XT, WARPS>(c, it, A, C, acc);
    if (it + WARPS < c.n_it) gemv_step<Dec, XT, WARPS>(c, it + WARPS, B, A, acc);
    if (it + 2 * WARPS < c.n_it) gemv_step<Dec, XT, WARPS>(c, it + 2 * WARPS, C, B, acc);
  }

  red[warp][g][2 * t] = acc[0];
  red[warp][g][2 * t + 1] = acc[1];
  red[warp][g + 8][2 * t] = acc[2];
  red[warp][g + 8][2 * t + 1] = acc[3];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 8; i += blockDim.x) {
    const int r = i & 15, n = i >> 4;
    if (n < m && row_base + r < rows) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) s += red[w][r][n];
      y[static_cast<int64_t>(n) * dec.out_rows() + dec.out_row(row_base + r)] = Cvt<XT>::from(s);
    }
  }
}

template <class Dec, typename XT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 2) gemv_kernel(const Dec dec, const XT* __restrict__ x, int m,
                                                          XT* __restrict__ y, bool x_vec) {
  __shared__ float red[WARPS][16][9];  // +1 pad: no bank conflicts on the transposed write
  __shared__ float dec_smem[Dec::kSmemFloats > 0 ? Dec::kSmemFloats : 1];
  gemv_tile<Dec, XT, WARPS>(dec, x, m, y, x_vec, blockIdx.x, red, dec_smem);
}

template <class Dec>
cudaError_t launch_gemv(const Dec& dec, const void* x, int64_t m, int x_dtype, void* y, bool x_vec,
                        cudaStream_t stream) {
  constexpr int kWarps = 8;
  const int grid = div_up(dec.rows(), 16);
  if (grid == 0 || m == 0) return cudaSuccess;
  if (x_dtype == kBF16) {
    gemv_kernel<Dec, __nv_bfloat16, kWarps><<<grid, kWarps * 32, 0, stream>>>(
        dec, static_cast<const __nv_bfloat16*>(x), static_cast<int>(m), static_cast<__nv_bfloat16*>(y), x_vec);
  } else if (x_dtype == kF16) {
    gemv_kernel<Dec, __half, kWarps><<<grid, kWarps * 32, 0, stream>>>(
        dec, static_cast<const __half*>(x), static_cast<int>(m), static_cast<__half*>(y), x_vec);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lowbit
