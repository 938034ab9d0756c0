// Layout lowra-v1 (lowbitpack/layouts/lowra.py): per-row width 1, 2 or 4 bits with a per-row fp16
// codebook. Rows are stored grouped by width (three dense matrices), so every kernel tile decodes one
// uniform width; rows_map scatters results back to the original row order.
//
// Reference arithmetic: w = float(codebook[row, code]) (exact), rounded once to the output dtype.
#include "gemv_core.cuh"

namespace lowbit {
namespace {

__device__ __forceinline__ float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// Code of (class row i, col) read byte by byte.
template <int B>
__device__ __forceinline__ uint32_t lowra_code(const LowraClass& c, int64_t row_bytes, int64_t i, int64_t col) {
  const int64_t bit = col * B;  // B divides 8: a code never straddles bytes
  return (static_cast<uint32_t>(__ldg(c.codes + i * row_bytes + (bit >> 3))) >> (bit & 7)) & ((1u << B) - 1u);
}

// ---------------------------------------------------------------- dequantize
// General path. Sub-chunks of 8 codes (B bytes) over the three classes back to back; a thread's class is uniform
// except at the two class boundaries.
template <int B, typename OutT>
__device__ __forceinline__ void lowra_subchunk(const LowraClass& c, int64_t cols, int64_t sc, OutT* __restrict__ out,
                                               bool vec_store) {
  const int64_t cpr = (cols + 7) / 8;
  const int64_t i = sc / cpr, ch = sc - i * cpr;
  const int64_t col0 = ch * 8;
  const int64_t row_bytes = (cols * B + 7) / 8;
  const int valid = static_cast<int>(imin64(8, cols - col0));
  const uint8_t* ptr = c.codes + i * row_bytes + ch * B;
  const int nbytes = static_cast<int>(imin64(B, row_bytes - ch * B));
  uint32_t raw = 0;
  for (int k = 0; k < nbytes; ++k) raw |= static_cast<uint32_t>(__ldg(ptr + k)) << (8 * k);
  const uint16_t* cb = c.codebook + i * (1 << B);
  float v[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = half_bits_to_float(__ldg(cb + ((raw >> (k * B)) & ((1u << B) - 1u))));
  store8<OutT>(out + static_cast<int64_t>(__ldg(c.rows_map + i)) * cols + col0, v, vec_store, valid);
}

template <typename OutT>
__global__ void __launch_bounds__(256) lowra_dequant_kernel(const LowraParams p, OutT* __restrict__ out,
                                                            int64_t n1, int64_t n2, int64_t n4, bool vec_store) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * 4 + threadIdx.x;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int64_t sc = base + static_cast<int64_t>(u) * blockDim.x;
    if (sc < n1) { lowra_subchunk<1>(p.cls[0], p.cols, sc, out, vec_store); continue; }
    sc -= n1;
    if (sc < n2) { lowra_subchunk<2>(p.cls[1], p.cols, sc, out, vec_store); continue; }
    sc -= n2;
    if (sc < n4) lowra_subchunk<4>(p.cls[2], p.cols, sc, out, vec_store);
  }
}

// Fast path: cols % 8 == 0 (a class's codes are one contiguous stream, sub-chunk sc at byte B * sc),
// aligned storage and a 16-byte aligned output. The grid is split among the classes, so a block decodes
// one width. As in intg's fast kernel, each thread issues all loads of its kLowraSub sub-chunks (spaced
// blockDim apart, so a warp's loads and stores stay contiguous) before any arithmetic. Widths 1 and 2
// load the row's whole codebook (2 or 4 fp16 = one 4- or 8-byte word) and pick entries with PRMT: two
// codes a, b give selector 0x22 * a + 0x2200 * b + 0x1010 (bytes 2a, 2a + 1, 2b, 2b + 1 of the
// codebook). Width 4 (16 entries) looks each code up with a cached load. At 14336 x 4096 (widths in equal
// shares) this takes 53.0 us against 67.2 us for the general kernel below on an H100 (bench/dequant_exp.cu).
constexpr int kLowraSub = 8;

template <int B, typename OutT>
__device__ __forceinline__ void lowra_fast_tile(const LowraClass& c, int64_t cols, uint32_t cpr, uint64_t cpr_magic,
                                                uint32_t tile, OutT* __restrict__ out) {
  const uint32_t n = static_cast<uint32_t>(c.n) * cpr;
  const uint32_t base = tile * blockDim.x * kLowraSub + threadIdx.x;
  uint32_t raw[kLowraSub], row[kLowraSub], book_lo[kLowraSub], book_hi[kLowraSub];
  int32_t orow[kLowraSub];
#pragma unroll
  for (int u = 0; u < kLowraSub; ++u) {
    const uint32_t sc = base + u * blockDim.x;
    raw[u] = row[u] = book_lo[u] = book_hi[u] = 0;
    orow[u] = 0;
    if (sc < n) {
      row[u] = div_by_magic(sc, cpr_magic);
      const uint8_t* ptr = c.codes + static_cast<uint64_t>(sc) * B;
      if constexpr (B == 4) raw[u] = __ldg(reinterpret_cast<const uint32_t*>(ptr));
      else if constexpr (B == 2) raw[u] = __ldg(reinterpret_cast<const uint16_t*>(ptr));
      else raw[u] = __ldg(ptr);
      orow[u] = __ldg(c.rows_map + row[u]);
      if constexpr (B == 1) {
        book_lo[u] = __ldg(reinterpret_cast<const uint32_t*>(c.codebook) + row[u]);
      } else if constexpr (B == 2) {
        const uint2 b = __ldg(reinterpret_cast<const uint2*>(c.codebook) + row[u]);
        book_lo[u] = b.x;
        book_hi[u] = b.y;
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kLowraSub; ++u) {
    const uint32_t sc = base + u * blockDim.x;
    if (sc < n) {
      float v[8];
#pragma unroll
      for (int k = 0; k < 8; k += 2) {
        const uint32_t a = (raw[u] >> (k * B)) & ((1u << B) - 1u), b = (raw[u] >> ((k + 1) * B)) & ((1u << B) - 1u);
        uint32_t pair;
        if constexpr (B == 4) {
          const uint16_t* cb = c.codebook + static_cast<uint64_t>(row[u]) * 16;
          pair = static_cast<uint32_t>(__ldg(cb + a)) | (static_cast<uint32_t>(__ldg(cb + b)) << 16);
        } else {
          pair = prmt(book_lo[u], book_hi[u], 0x22u * a + 0x2200u * b + 0x1010u);
        }
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&pair));
        v[k] = f.x;
        v[k + 1] = f.y;
      }
      const uint32_t col0 = (sc - row[u] * cpr) * 8;
      store8<OutT>(out + static_cast<int64_t>(orow[u]) * cols + col0, v, true, 8);
    }
  }
}

template <typename OutT>
__global__ void __launch_bounds__(256) lowra_dequant_fast_kernel(const LowraParams p, OutT* __restrict__ out,
                                                                 uint32_t cpr, uint64_t cpr_magic, uint32_t end1,
                                                                 uint32_t end2) {
  // block-uniform: blocks [0, end1) decode class 1, [end1, end2) class 2, the rest class 4
  if (blockIdx.x < end1) lowra_fast_tile<1>(p.cls[0], p.cols, cpr, cpr_magic, blockIdx.x, out);
  else if (blockIdx.x < end2) lowra_fast_tile<2>(p.cls[1], p.cols, cpr, cpr_magic, blockIdx.x - end1, out);
  else lowra_fast_tile<4>(p.cls[2], p.cols, cpr, cpr_magic, blockIdx.x - end2, out);
}

// ---------------------------------------------------------------- GEMV decoder
// The tile's 16 codebooks sit in shared memory replicated per lane, entry (q, slot, lane) at word
// 64*q + 32*slot + lane (slot 0: the lane's row g, 1: row g + 8). Every lane reads its own bank, so the
// random codes of a warp never conflict (a plain [row][q] table had ~3-way conflicts per lookup). The
// address is one PRMT (q into byte 1, 4*lane + 128*slot in byte 0) plus the table's base.
template <int B>
struct LowraDecoder {
  static constexpr int kWords = B;              // 32 codes of B bits
  static constexpr int kSmemFloats = 64 << B;   // 2^B codes x 2 slots x 32 lanes
  LowraClass c;
  int64_t all_rows, ncols, row_bytes;
  bool aligned;

  struct Raw { uint32_t w[B]; };
  struct State { uint32_t lane_slot, lut; };

  __device__ __forceinline__ void prologue(float* smem, int64_t tile) const {
    for (int i = threadIdx.x; i < kSmemFloats; i += blockDim.x) {
      const int q = i >> 6, slot = (i >> 5) & 1, lane = i & 31;
      const int64_t row = imin64(tile * 16 + slot * 8 + (lane >> 2), c.n - 1);  // clamped like the core's rows
      smem[i] = half_bits_to_float(__ldg(c.codebook + row * (1 << B) + q));
    }
  }
  __host__ __device__ __forceinline__ int64_t rows() const { return c.n; }
  __host__ __device__ __forceinline__ int64_t cols() const { return ncols; }
  __device__ __forceinline__ int64_t out_rows() const { return all_rows; }
  __device__ __forceinline__ int64_t out_row(int64_t r) const { return __ldg(c.rows_map + r); }
  __device__ __forceinline__ bool fast_ok(int64_t col_end) const { return aligned && col_end <= ncols; }

  __device__ __forceinline__ void fetch(int64_t row, int64_t col0, Raw& r) const {
    uint32_t (&w)[B] = r.w;
    const uint8_t* ptr = c.codes + row * row_bytes + (col0 >> 3) * B;
    if constexpr (B == 4) {
      uint4 v = ldg_stream16(ptr);
      w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (B == 2) {
      uint2 v = __ldg(reinterpret_cast<const uint2*>(ptr));
      w[0] = v.x; w[1] = v.y;
    } else {
      w[0] = __ldg(reinterpret_cast<const uint32_t*>(ptr));
    }
  }

  __device__ __forceinline__ State state(const Raw&, int64_t, int slot, int64_t, const float* smem) const {
    return State{(threadIdx.x & 31u) * 4u + static_cast<uint32_t>(slot) * 128u, smem_addr(smem)};
  }

  __device__ __forceinline__ void decode8(const uint32_t (&w)[B], const State& st, int i, int64_t, int64_t,
                                          const float*, float (&out)[8]) const {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int cc = 8 * i + k;
      const uint32_t m = code_bytes<B>(w, cc);  // byte (cc's byte) holds the code
      const uint32_t rel = prmt(m, st.lane_slot, 0x5504u | (code_byte_index<B>(cc) << 4));
      out[k] = lds_f32(st.lut + rel);
    }
  }

  __device__ __forceinline__ float value_slow(int64_t row, int64_t col, const float*) const {
    return half_bits_to_float(__ldg(c.codebook + row * (1 << B) + lowra_code<B>(c, row_bytes, row, col)));
  }
};

template <typename XT>
__global__ void __launch_bounds__(kMaxWarps * 32, kMinBlocks) lowra_gemv_kernel(const LowraDecoder<1> d1, const LowraDecoder<2> d2,
                                                                    const LowraDecoder<4> d4, const XT* __restrict__ x,
                                                                    int m, XT* __restrict__ y, bool x_vec) {
  __shared__ float red[kMaxWarps][16][9];
  static_assert(LowraDecoder<1>::kSmemFloats <= LowraDecoder<4>::kSmemFloats &&
                LowraDecoder<2>::kSmemFloats <= LowraDecoder<4>::kSmemFloats, "one LUT buffer serves all widths");
  __shared__ __align__(256) float lut[LowraDecoder<4>::kSmemFloats];
  const int64_t t1 = (d1.c.n + 15) / 16, t2 = (d2.c.n + 15) / 16;
  const int64_t tile = blockIdx.x;  // block-uniform branch: each block is one tile of one width class
  if (tile < t1) gemv_tile<LowraDecoder<1>, XT>(d1, x, m, y, x_vec, tile, red, lut);
  else if (tile < t1 + t2) gemv_tile<LowraDecoder<2>, XT>(d2, x, m, y, x_vec, tile - t1, red, lut);
  else gemv_tile<LowraDecoder<4>, XT>(d4, x, m, y, x_vec, tile - t1 - t2, red, lut);
}

template <int B>
LowraDecoder<B> make_decoder(const LowraParams& p, int idx) {
  LowraDecoder<B> d;
  d.c = p.cls[idx];
  d.all_rows = p.rows;
  d.ncols = p.cols;
  d.row_bytes = (p.cols * B + 7) / 8;
  d.aligned = (p.cols % 32 == 0) && (reinterpret_cast<uintptr_t>(d.c.codes) % 16 == 0);
  return d;
}

// The fast kernel's vector loads need each class's codes aligned to its B-byte sub-chunks and its codebook
// rows (2^B fp16) aligned to their size for widths 1 and 2.
bool lowra_fast_ok(const LowraParams& p) {
  constexpr int kCodeAlign[3] = {1, 2, 4}, kBookAlign[3] = {4, 8, 2};
  for (int i = 0; i < 3; ++i) {
    const LowraClass& c = p.cls[i];
    if (c.n == 0) continue;
    if (reinterpret_cast<uintptr_t>(c.codes) % kCodeAlign[i] || reinterpret_cast<uintptr_t>(c.codebook) % kBookAlign[i])
      return false;
  }
  return true;
}

}  // namespace

cudaError_t lowra_dequant(const LowraParams& p, void* out, int out_dtype, cudaStream_t stream) {
  const int64_t cpr = (p.cols + 7) / 8;
  const int64_t n1 = p.cls[0].n * cpr, n2 = p.cls[1].n * cpr, n4 = p.cls[2].n * cpr;
  const int64_t total = n1 + n2 + n4;
  if (total == 0) return cudaSuccess;
  const bool vec_store = (p.cols % 8 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int threads = 256;
  if (vec_store && lowra_fast_ok(p) && total < (int64_t(1) << 32) - threads * kLowraSub * 3) {
    const int64_t per_block = threads * kLowraSub;
    const uint32_t end1 = static_cast<uint32_t>((n1 + per_block - 1) / per_block);
    const uint32_t end2 = end1 + static_cast<uint32_t>((n2 + per_block - 1) / per_block);
    const uint32_t g = end2 + static_cast<uint32_t>((n4 + per_block - 1) / per_block);
    const uint32_t c = static_cast<uint32_t>(cpr);
    const uint64_t magic = div_magic(c);
    return with_out_type(out_dtype, [&](auto tag) {
      using OutT = decltype(tag);
      lowra_dequant_fast_kernel<OutT><<<g, threads, 0, stream>>>(p, static_cast<OutT*>(out), c, magic, end1, end2);
    });
  }
  const int64_t grid = (total + threads * 4 - 1) / (threads * 4);
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned g = static_cast<unsigned>(grid);
  return with_out_type(out_dtype, [&](auto tag) {
    using OutT = decltype(tag);
    lowra_dequant_kernel<OutT><<<g, threads, 0, stream>>>(p, static_cast<OutT*>(out), n1, n2, n4, vec_store);
  });
}

cudaError_t lowra_gemv(const LowraParams& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream) {
  if (m < 1 || m > 8) return cudaErrorInvalidValue;
  const auto d1 = make_decoder<1>(p, 0);
  const auto d2 = make_decoder<2>(p, 1);
  const auto d4 = make_decoder<4>(p, 2);
  const int64_t tiles = (p.cls[0].n + 15) / 16 + (p.cls[1].n + 15) / 16 + (p.cls[2].n + 15) / 16;
  if (tiles == 0) return cudaSuccess;
  const bool x_vec = (p.cols % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0);
  const unsigned g = static_cast<unsigned>(tiles);
  const int threads = 32 * gemv_warps(tiles, p.cols);
  if (x_dtype == kBF16) {
    lowra_gemv_kernel<__nv_bfloat16><<<g, threads, 0, stream>>>(
        d1, d2, d4, static_cast<const __nv_bfloat16*>(x), static_cast<int>(m), static_cast<__nv_bfloat16*>(y), x_vec);
  } else if (x_dtype == kF16) {
    lowra_gemv_kernel<__half><<<g, threads, 0, stream>>>(
        d1, d2, d4, static_cast<const __half*>(x), static_cast<int>(m), static_cast<__half*>(y), x_vec);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lowbit
