// Fused dequant-GEMV core shared by all layouts: y[m, rows] = x[m, cols] @ W^T, 1 <= m <= 8.
//
// Why tensor cores for a GEMV: dequantizing on CUDA cores and then doing m FMAs per weight makes the
// kernel instruction-bound long before it is memory-bound (~8 instructions per weight at m = 1, ~25 at
// m = 8). With mma.m16n8k16 the m rows of x ride along as the n = 8 columns of B for free, and each
// weight costs only its decode plus half a pack instruction.
//
// Tiling: a block owns 16 output rows; its warps (4 or 8, chosen per launch so that the GPU holds
// enough warps) split the input dimension (split-K) and reduce through shared memory at the end. Per
// iteration a warp covers 128 input columns: lane = 4*g + t reads the 32 consecutive codes
// [col0, col0 + 32) with col0 = it*128 + 32*t of rows g and g + 8 (one 16-byte load per row for 4-bit),
// i.e. 16 rows x 64 contiguous bytes per warp.
//
// The k order inside an mma is free as long as A and B agree, so the k slots of lane t
// ({2t, 2t+1, 2t+8, 2t+9}) are mapped to ITS OWN four consecutive columns col0 + 4j + {0,1,2,3} in mma j
// (j = 0..7). All lanes with the same t use the same columns, which is what the fragment layout requires,
// and the B fragment is then just x's own consecutive pairs: no shuffles, no shared memory staging.
// Even and odd j accumulate into two separate fp32 fragments (summed at the end), so consecutive mmas do
// not wait on each other.
//
// Latency: everything a chunk needs from global memory (codes, and the raw bits of its scale / absmax
// code) is fetched kPrefetch iterations ahead into rotating register buffers; the
// dependent arithmetic (shared-memory lookups, conversions) waits until the data is there. The first two
// fetches are issued before the decoder's shared-memory prologue, so its latency hides behind them.
//
// Decode cost is what bounds this kernel (the H100 issues ~128 lane-instructions per clock per SM, and a
// 14336x4096 weight has 59M weights): decoders work on 8 codes at a time and spend about one integer
// instruction per weight to get at a code (masks over a whole word, then one PRMT per code that both
// extracts the code and builds the shared-memory address or the 2^23 + q float).
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
//   State state(raw, row, slot, col0, smem)              per-(row, chunk) parameters from the raw bits;
//                                                        slot 0: the lane's row g, 1: row g + 8
//   decode8(w, st, i, row, col0, smem, out[8])           fast path: columns col0 + 8i .. +7, fp32
//   value_slow(row, col, smem)                           any column < cols, byte loads, any alignment
// Both paths compute exactly the reference's fp32 value.
#pragma once

#include <cstdlib>

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
  int t, warps;
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
// `it + kPrefetch * warps` into `ahead` (the buffer the previous step consumed).
template <class Dec, typename XT>
__device__ __forceinline__ void gemv_step(const TileCtx<Dec, XT>& c, int64_t it, ChunkBuf<Dec>& cur,
                                          ChunkBuf<Dec>& ahead, float (&acc0)[4], float (&acc1)[4]) {
  const int64_t col0 = it * 128 + 32 * c.t;
  const int64_t it_ahead = it + kPrefetch * c.warps;
  if (c.fast(it_ahead)) c.fetch(it_ahead, ahead);
  if (c.fast(it)) {
    uint32_t xv[16];  // x is small and cache-resident: loaded here, not prefetched (saves 16 registers a buffer)
    load_x32<XT>(c.xr, col0, c.x_active, c.x_vec, xv);
    const typename Dec::State s0 = c.dec.state(cur.r0, c.r0, 0, col0, c.smem);
    const typename Dec::State s1 = c.dec.state(cur.r1, c.r1, 1, col0, c.smem);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float a[8], b[8];
      c.dec.decode8(cur.r0.w, s0, i, c.r0, col0, c.smem, a);
      c.dec.decode8(cur.r1.w, s1, i, c.r1, col0, c.smem, b);
      // Round each weight to x's dtype exactly as dequantize(W, x.dtype) would; the mma multiplies
      // exactly and accumulates in fp32.
      mma16816<XT>(acc0, Cvt<XT>::pack2(a[0], a[1]), Cvt<XT>::pack2(b[0], b[1]), Cvt<XT>::pack2(a[2], a[3]),
                   Cvt<XT>::pack2(b[2], b[3]), xv[4 * i], xv[4 * i + 1]);
      mma16816<XT>(acc1, Cvt<XT>::pack2(a[4], a[5]), Cvt<XT>::pack2(b[4], b[5]), Cvt<XT>::pack2(a[6], a[7]),
                   Cvt<XT>::pack2(b[6], b[7]), xv[4 * i + 2], xv[4 * i + 3]);
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
      mma16816<XT>(acc0, Cvt<XT>::pack2(a[0], a[1]), Cvt<XT>::pack2(b[0], b[1]), Cvt<XT>::pack2(a[2], a[3]),
                   Cvt<XT>::pack2(b[2], b[3]), xb[0] | (xb[1] << 16), xb[2] | (xb[3] << 16));
    }
  }
}

// Most warps a block may have (shared reduction buffer size, launch bounds).
constexpr int kMaxWarps = 8;
// Register budget: kMinBlocks resident blocks of kMaxWarps warps, i.e. at most 128 registers a thread (the
// compiler uses ~100-128: 16 warps per SM). Capping at 85 (3 blocks, 24 warps) was measured on the H100:
// the spills it costs made NF4 40% slower and nothing faster.
constexpr int kMinBlocks = 2;

// One block's tile: output rows [16*tile, 16*tile + 16) of `dec`, split over blockDim.x / 32 warps. Shared
// memory comes from the caller so that one kernel can run tiles of several decoders (LowRA's width classes).
template <class Dec, typename XT>
__device__ __forceinline__ void gemv_tile(const Dec& dec, const XT* __restrict__ x, int m, XT* __restrict__ y,
                                          bool x_vec, int64_t tile, float (*red)[16][9], float* dec_smem) {
  static_assert(sizeof(decltype(Dec::Raw::w)) == Dec::kWords * sizeof(uint32_t), "Raw::w holds kWords words");
  const int64_t rows = dec.rows();
  const int warps = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t row_base = tile * 16;
  const bool x_active = g < m;
  // Rows past the end are clamped (in-bounds reads) and never stored.
  const TileCtx<Dec, XT> c{dec, x + static_cast<int64_t>(x_active ? g : 0) * dec.cols(),
                           min(row_base + g, rows - 1), min(row_base + g + 8, rows - 1),
                           (dec.cols() + 127) / 128, dec.cols(), t, warps, x_active, x_vec, dec_smem};

  float acc0[4] = {0.f, 0.f, 0.f, 0.f}, acc1[4] = {0.f, 0.f, 0.f, 0.f};
  // Three rotating buffers (kPrefetch + 1), the loop unrolled by three so they never need copying.
  static_assert(kPrefetch == 2, "the rotation below is written for two iterations in flight");
  ChunkBuf<Dec> A, B, C;
  if (c.fast(warp)) c.fetch(warp, A);
  if (c.fast(warp + warps)) c.fetch(warp + warps, B);
  // The decoder's tables (global -> shared) load while the first chunks are in flight.
  dec.prologue(dec_smem, tile);
  __syncthreads();
  for (int64_t it = warp; it < c.n_it; it += 3 * warps) {
    gemv_step<Dec, XT>(c, it, A, C, acc0, acc1);
    if (it + warps < c.n_it) gemv_step<Dec, XT>(c, it + warps, B, A, acc0, acc1);
    if (it + 2 * warps < c.n_it) gemv_step<Dec, XT>(c, it + 2 * warps, C, B, acc0, acc1);
  }

  red[warp][g][2 * t] = acc0[0] + acc1[0];
  red[warp][g][2 * t + 1] = acc0[1] + acc1[1];
  red[warp][g + 8][2 * t] = acc0[2] + acc1[2];
  red[warp][g + 8][2 * t + 1] = acc0[3] + acc1[3];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 8; i += blockDim.x) {
    const int r = i & 15, n = i >> 4;
    if (n < m && row_base + r < rows) {
      float s = 0.f;
      for (int w = 0; w < warps; ++w) s += red[w][r][n];
      y[static_cast<int64_t>(n) * dec.out_rows() + dec.out_row(row_base + r)] = Cvt<XT>::from(s);
    }
  }
}

template <class Dec, typename XT>
__global__ void __launch_bounds__(kMaxWarps * 32, kMinBlocks) gemv_kernel(const Dec dec, const XT* __restrict__ x, int m,
                                                                    XT* __restrict__ y, bool x_vec) {
  __shared__ float red[kMaxWarps][16][9];  // +1 pad: no bank conflicts on the transposed write
  // 256-byte aligned: decoders build LUT addresses by replacing the low byte (see Nf4Decoder).
  __shared__ __align__(256) float dec_smem[Dec::kSmemFloats > 0 ? Dec::kSmemFloats : 1];
  gemv_tile<Dec, XT>(dec, x, m, y, x_vec, blockIdx.x, red, dec_smem);
}

// Warps per block (split-K): 4, or 8 when 4 would leave fewer than ~24 warps per SM, since fewer warps per
// tile mean longer runs per warp and less reduction (16 was measured slower everywhere on the H100).
// LOWBITPACK_GEMV_WARPS=4|8 forces it
// (tests and bench/kernels.py use that to cover and compare the variants).
inline int gemv_warps(int64_t tiles, int64_t cols) {
  if (const char* e = std::getenv("LOWBITPACK_GEMV_WARPS")) {
    const int w = std::atoi(e);
    if (w == 4 || w == 8) return w;
  }
  static int sm_count[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  int& sms = sm_count[dev & 63];
  if (sms == 0 && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) sms = 132;
  const int64_t n_it = (cols + 127) / 128;
  int w = 4;
  while (w < kMaxWarps && tiles * w < 24 * static_cast<int64_t>(sms) && n_it >= 2 * w) w *= 2;
  return w;
}

template <class Dec>
cudaError_t launch_gemv(const Dec& dec, const void* x, int64_t m, int x_dtype, void* y, bool x_vec,
                        cudaStream_t stream) {
  const int grid = div_up(dec.rows(), 16);
  if (grid == 0 || m == 0) return cudaSuccess;
  const int threads = 32 * gemv_warps(grid, dec.cols());
  if (x_dtype == kBF16) {
    gemv_kernel<Dec, __nv_bfloat16><<<grid, threads, 0, stream>>>(
        dec, static_cast<const __nv_bfloat16*>(x), static_cast<int>(m), static_cast<__nv_bfloat16*>(y), x_vec);
  } else if (x_dtype == kF16) {
    gemv_kernel<Dec, __half><<<grid, threads, 0, stream>>>(
        dec, static_cast<const __half*>(x), static_cast<int>(m), static_cast<__half*>(y), x_vec);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lowbit
