// Layout intg-v1 (lowbitpack/layouts/intg.py): dequantize kernel.
//
// Reference arithmetic (fp32, then one rounding to the output dtype):
//   zero mode:   w = (q - z) * s        offset mode:  w = q * s + m
// q is the code (exact in fp32), z the uint8 zero, s / m the group's scale / offset read as fp32.

#include "intg_common.cuh"

namespace lowbit {
namespace {
using namespace intg;

// ---------------------------------------------------------------- dequantize
// General path (g_idx, groups smaller than or not a multiple of 8, ragged or unaligned rows).
// One sub-chunk = 8 consecutive codes of one row = exactly B bytes. Each thread does 4 sub-chunks spaced
// blockDim apart, so a warp's loads and 16-byte stores are contiguous.
template <int B, bool OFFSET, typename OutT>
__global__ void __launch_bounds__(256) intg_dequant_kernel(const IntgParams p, OutT* __restrict__ out,
                                                           int64_t chunks_per_row, int64_t n_chunks,
                                                           bool aligned_load, bool vec_store) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * 4 + threadIdx.x;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t sc = base + static_cast<int64_t>(u) * blockDim.x;
    if (sc >= n_chunks) break;
    int64_t row, c;
    if (n_chunks < (int64_t(1) << 31)) {  // 32-bit division is several times cheaper
      row = static_cast<uint32_t>(sc) / static_cast<uint32_t>(chunks_per_row);
      c = static_cast<uint32_t>(sc) - static_cast<uint32_t>(row) * static_cast<uint32_t>(chunks_per_row);
    } else {
      row = sc / chunks_per_row;
      c = sc - row * chunks_per_row;
    }
    const int64_t col0 = c * 8;
    const int valid = static_cast<int>(imin64(8, p.cols - col0));
    const uint8_t* ptr = p.qweight + row * p.row_bytes + c * B;
    const int nbytes = static_cast<int>(imin64(B, p.row_bytes - c * B));
    uint64_t raw = 0;
    if (aligned_load && nbytes == B) {
      if constexpr (B == 8) raw = __ldg(reinterpret_cast<const unsigned long long*>(ptr));
      else if constexpr (B == 4) raw = __ldg(reinterpret_cast<const unsigned int*>(ptr));
      else if constexpr (B == 2) raw = __ldg(reinterpret_cast<const unsigned short*>(ptr));
      else if constexpr (B == 1) raw = __ldg(ptr);
      else {
#pragma unroll
        for (int i = 0; i < B; ++i) raw |= static_cast<uint64_t>(__ldg(ptr + i)) << (8 * i);
      }
    } else {
      for (int i = 0; i < nbytes; ++i) raw |= static_cast<uint64_t>(__ldg(ptr + i)) << (8 * i);
    }

    float v[8];
    if (!p.g_idx && p.group_size >= 8) {
      // 8 consecutive columns span at most two groups.
      const int64_t g0 = col0 / p.group_size;
      const int64_t boundary = (g0 + 1) * p.group_size;
      float s0, z0, s1 = 0.f, z1 = 0.f;
      group_params<OFFSET>(p, row, g0, s0, z0);
      if (col0 + valid > boundary) group_params<OFFSET>(p, row, g0 + 1, s1, z1);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const uint32_t q = static_cast<uint32_t>(raw >> (k * B)) & ((1u << B) - 1u);
        const bool second = col0 + k >= boundary;
        v[k] = dequant_one<OFFSET>(q, second ? s1 : s0, second ? z1 : z0);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        v[k] = 0.f;
        if (k < valid) {
          float s, z;
          group_params<OFFSET>(p, row, group_of(p, col0 + k), s, z);
          v[k] = dequant_one<OFFSET>(static_cast<uint32_t>(raw >> (k * B)) & ((1u << B) - 1u), s, z);
        }
      }
    }
    store8<OutT>(out + row * p.cols + col0, v, vec_store, valid);
  }
}

// Fast path: no g_idx, group_size % 8 == 0, cols % 8 == 0, 8-byte aligned codes and 16-byte aligned output
// (every sub-chunk whole, one group, vector-aligned). Each thread handles kSub sub-chunks spaced blockDim
// apart (a warp's loads and stores stay contiguous) in two phases: all global loads (codes, and the raw
// bits of scale and zero/offset) first, then the arithmetic and the stores, so a thread has 3 * kSub
// independent loads in flight instead of one sub-chunk's chain at a time (the compiler cannot move loads
// above the previous sub-chunk's stores on its own).
constexpr int kSub = 8;

template <int B>
__device__ __forceinline__ uint64_t load_codes8(const uint8_t* ptr) {
  if constexpr (B == 8) return __ldg(reinterpret_cast<const unsigned long long*>(ptr));
  else if constexpr (B == 4) return __ldg(reinterpret_cast<const unsigned int*>(ptr));
  else if constexpr (B == 2) return __ldg(reinterpret_cast<const unsigned short*>(ptr));
  else if constexpr (B == 1) return __ldg(ptr);
  else {
    uint64_t raw = 0;
#pragma unroll
    for (int i = 0; i < B; ++i) raw |= static_cast<uint64_t>(__ldg(ptr + i)) << (8 * i);
    return raw;
  }
}

// n / d for n < 2^32 and 2 <= d < 2^32 with one 64-bit high multiply instead of a ~20-instruction division:
// magic = ceil(2^64 / d) (host: div_magic), and floor(n * magic / 2^64) = floor(n / d) because the rounding
// adds less than n / 2^64 < 2^-32 < 1 / d. d = 1 passes magic 0 and divides by itself.
__device__ __forceinline__ uint32_t div_by_magic(uint32_t n, uint64_t magic) {
  return magic ? static_cast<uint32_t>(__umul64hi(static_cast<uint64_t>(n), magic)) : n;
}
inline uint64_t div_magic(uint32_t d) { return d < 2 ? 0 : (~uint64_t(0) / d) + 1; }

template <int B, bool OFFSET, typename OutT>
__global__ void __launch_bounds__(256) intg_dequant_fast_kernel(const IntgParams p, OutT* __restrict__ out,
                                                                uint32_t chunks_per_row, uint64_t cpr_magic,
                                                                uint32_t n_chunks, int g_shift) {
  const uint32_t base = blockIdx.x * blockDim.x * kSub + threadIdx.x;
  uint64_t raw[kSub];
  uint32_t s_bits[kSub], z_bits[kSub];
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
    const uint32_t sc = base + u * blockDim.x;
    raw[u] = 0;
    s_bits[u] = z_bits[u] = 0;
    if (sc < n_chunks) {
      const uint32_t row = div_by_magic(sc, cpr_magic), c = sc - row * chunks_per_row;
      raw[u] = load_codes8<B>(p.qweight + static_cast<int64_t>(row) * p.row_bytes + c * B);
      const uint32_t col0 = c * 8;
      const uint32_t g = g_shift >= 0 ? (col0 >> g_shift) : col0 / static_cast<uint32_t>(p.group_size);
      const int64_t gi = static_cast<int64_t>(row) * p.n_groups + g;
      s_bits[u] = load_bits(p.scale, p.scale_dtype, gi);
      if constexpr (OFFSET) z_bits[u] = load_bits(p.offset, p.offset_dtype, gi);
      else z_bits[u] = __ldg(p.zero + gi);
    }
  }
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
    const uint32_t sc = base + u * blockDim.x;
    if (sc < n_chunks) {
      const float s = bits_to_float(s_bits[u], p.scale_dtype);
      const float z = OFFSET ? bits_to_float(z_bits[u], p.offset_dtype) : kMagic + static_cast<float>(z_bits[u]);
      float v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k)
        v[k] = dequant_one<OFFSET>(static_cast<uint32_t>(raw[u] >> (k * B)) & ((1u << B) - 1u), s, z);
      // row * cols + col0 == sc * 8 (cols = 8 * chunks_per_row)
      store8<OutT>(out + static_cast<int64_t>(sc) * 8, v, true, 8);
    }
  }
}

template <int B, bool OFFSET, typename OutT>
cudaError_t launch_fast(const IntgParams& p, void* out, int64_t cpr, int64_t n_chunks, cudaStream_t stream) {
  const int threads = 256;
  const int64_t grid = (n_chunks + threads * kSub - 1) / (threads * kSub);
  intg_dequant_fast_kernel<B, OFFSET, OutT><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
      p, static_cast<OutT*>(out), static_cast<uint32_t>(cpr), div_magic(static_cast<uint32_t>(cpr)),
      static_cast<uint32_t>(n_chunks), log2_exact(p.group_size));
  return cudaGetLastError();
}

template <int B, bool OFFSET>
cudaError_t dequant_b(const IntgParams& p, void* out, int out_dtype, cudaStream_t stream) {
  const int64_t cpr = (p.cols + 7) / 8;
  const int64_t n_chunks = cpr * p.rows;
  if (n_chunks == 0) return cudaSuccess;
  // u32/u64/u16 loads need every sub-chunk start aligned: row_bytes a multiple of B (cols % 8 == 0).
  const bool aligned_load = (p.cols % 8 == 0) && (reinterpret_cast<uintptr_t>(p.qweight) % 8 == 0);
  const bool vec_store = (p.cols % 8 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  if (aligned_load && vec_store && !p.g_idx && p.group_size % 8 == 0 && n_chunks < (int64_t(1) << 32) - 4096) {
    switch (out_dtype) {
      case kF32: return launch_fast<B, OFFSET, float>(p, out, cpr, n_chunks, stream);
      case kF16: return launch_fast<B, OFFSET, __half>(p, out, cpr, n_chunks, stream);
      case kBF16: return launch_fast<B, OFFSET, __nv_bfloat16>(p, out, cpr, n_chunks, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  const int threads = 256;
  const int64_t grid = (n_chunks + threads * 4 - 1) / (threads * 4);
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (out_dtype) {
    case kF32:
      intg_dequant_kernel<B, OFFSET, float><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
          p, static_cast<float*>(out), cpr, n_chunks, aligned_load, vec_store);
      break;
    case kF16:
      intg_dequant_kernel<B, OFFSET, __half><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
          p, static_cast<__half*>(out), cpr, n_chunks, aligned_load, vec_store);
      break;
    case kBF16:
      intg_dequant_kernel<B, OFFSET, __nv_bfloat16><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
          p, static_cast<__nv_bfloat16*>(out), cpr, n_chunks, aligned_load, vec_store);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <int B>
cudaError_t dequant_bits(const IntgParams& p, void* out, int out_dtype, cudaStream_t stream) {
  return p.offset ? dequant_b<B, true>(p, out, out_dtype, stream) : dequant_b<B, false>(p, out, out_dtype, stream);
}

}  // namespace

cudaError_t intg_dequant(const IntgParams& p, void* out, int out_dtype, cudaStream_t stream) {
  switch (p.bits) {
    case 1: return dequant_bits<1>(p, out, out_dtype, stream);
    case 2: return dequant_bits<2>(p, out, out_dtype, stream);
    case 3: return dequant_bits<3>(p, out, out_dtype, stream);
    case 4: return dequant_bits<4>(p, out, out_dtype, stream);
    case 5: return dequant_bits<5>(p, out, out_dtype, stream);
    case 6: return dequant_bits<6>(p, out, out_dtype, stream);
    case 7: return dequant_bits<7>(p, out, out_dtype, stream);
    case 8: return dequant_bits<8>(p, out, out_dtype, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lowbit
