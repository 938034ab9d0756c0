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
// General path (g_idx, groups smaller than or not a multiple of 8, ragged rows, storage not 16-byte aligned).
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

// Fast path: no g_idx, group_size % 8 == 0, cols % 8 == 0 (so the codes of all rows are one contiguous stream
// and sub-chunk sc sits at byte B * sc), a 16-byte aligned qweight and output. A block of 256 threads owns
// kSub * 256 consecutive sub-chunks, whose codes are one run of kSub * 256 * B bytes (a multiple of 16):
//  1. it copies them into shared memory with 16-byte cp.async (one load instruction per 16 bytes, where
//     direct loads took one per sub-chunk, and B byte loads for B = 3, 5, 6, 7),
//  2. meanwhile each thread loads the raw bits of scale and zero/offset for its kSub sub-chunks (spaced 256
//     apart, so a warp's loads and 16-byte stores stay contiguous),
//  3. after the copy it reads its sub-chunks' B bytes from shared memory as aligned words and a funnel shift,
//     computes and stores.
// Against direct loads this took 14336 x 4096 from 57.0 / 63.2 / 59.8 us to 51.5 / 53.7 / 55.9 us for
// 2 / 3 / 4 bits on an H100 (bench/dequant_exp.cu, docs/KERNELS.md).
constexpr int kThreads = 256, kSub = 8;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}

// B (<= 8) bytes at `byte` of a shared buffer that has at least 8 readable bytes past it, as one integer.
template <int B>
__device__ __forceinline__ uint64_t smem_codes8(const uint8_t* s, uint32_t byte) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(s) + (byte >> 2);
  const uint32_t sh = (byte & 3) * 8;
  const uint32_t lo = __funnelshift_r(w[0], w[1], sh);
  if constexpr (B <= 4) return lo & static_cast<uint32_t>((uint64_t(1) << (8 * B)) - 1);
  const uint32_t hi = __funnelshift_r(w[1], w[2], sh);
  return (static_cast<uint64_t>(hi) << 32 | lo) & (~uint64_t(0) >> (64 - 8 * B));
}

template <int B, bool OFFSET, typename OutT>
__global__ void __launch_bounds__(kThreads) intg_dequant_fast_kernel(const IntgParams p, OutT* __restrict__ out,
                                                                     uint32_t chunks_per_row, uint64_t cpr_magic,
                                                                     uint32_t n_chunks, int g_shift,
                                                                     uint64_t total_bytes) {
  constexpr int kBytes = kThreads * kSub * B;
  __shared__ __align__(16) uint8_t codes[kBytes + 16];  // +16: the last thread's word reads stay inside
  const uint32_t first = blockIdx.x * kThreads * kSub;
  const uint64_t byte0 = static_cast<uint64_t>(first) * B;
  for (int i = threadIdx.x; i < kBytes / 16; i += kThreads) {
    const uint64_t g = byte0 + static_cast<uint64_t>(i) * 16;
    if (g + 16 <= total_bytes) {
      cp_async16(codes + i * 16, p.qweight + g);
    } else {  // the last block's run passes the end of qweight
      for (int k = 0; k < 16; ++k) codes[i * 16 + k] = g + k < total_bytes ? __ldg(p.qweight + g + k) : 0;
    }
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
  uint32_t s_bits[kSub], z_bits[kSub];
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
    const uint32_t sc = first + u * kThreads + threadIdx.x;
    s_bits[u] = z_bits[u] = 0;
    if (sc < n_chunks) {
      const uint32_t row = div_by_magic(sc, cpr_magic), c = sc - row * chunks_per_row;
      const uint32_t col0 = c * 8;
      const uint32_t g = g_shift >= 0 ? (col0 >> g_shift) : col0 / static_cast<uint32_t>(p.group_size);
      const int64_t gi = static_cast<int64_t>(row) * p.n_groups + g;
      s_bits[u] = load_bits(p.scale, p.scale_dtype, gi);
      if constexpr (OFFSET) z_bits[u] = load_bits(p.offset, p.offset_dtype, gi);
      else z_bits[u] = __ldg(p.zero + gi);
    }
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
    const uint32_t j = u * kThreads + threadIdx.x, sc = first + j;
    if (sc < n_chunks) {
      const uint64_t raw = smem_codes8<B>(codes, j * B);
      const float s = bits_to_float(s_bits[u], p.scale_dtype);
      const float z = OFFSET ? bits_to_float(z_bits[u], p.offset_dtype) : kMagic + static_cast<float>(z_bits[u]);
      float v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k)
        v[k] = dequant_one<OFFSET>(static_cast<uint32_t>(raw >> (k * B)) & ((1u << B) - 1u), s, z);
      store8<OutT>(out + static_cast<int64_t>(sc) * 8, v, true, 8);  // row * cols + col0 == 8 * sc
    }
  }
}

template <int B, bool OFFSET>
cudaError_t dequant_b(const IntgParams& p, void* out, int out_dtype, cudaStream_t stream) {
  const int64_t cpr = (p.cols + 7) / 8;
  const int64_t n_chunks = cpr * p.rows;
  if (n_chunks == 0) return cudaSuccess;
  // u32/u64/u16 loads need every sub-chunk start aligned: row_bytes a multiple of B (cols % 8 == 0).
  const bool aligned_load = (p.cols % 8 == 0) && (reinterpret_cast<uintptr_t>(p.qweight) % 8 == 0);
  const bool vec_store = (p.cols % 8 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const bool fast = vec_store && !p.g_idx && p.group_size % 8 == 0 && p.row_bytes == cpr * B &&
                    reinterpret_cast<uintptr_t>(p.qweight) % 16 == 0 && n_chunks < (int64_t(1) << 32) - kThreads * kSub;
  if (fast) {
    return with_out_type(out_dtype, [&](auto tag) {
      using OutT = decltype(tag);
      const int64_t grid = (n_chunks + kThreads * kSub - 1) / (kThreads * kSub);
      intg_dequant_fast_kernel<B, OFFSET, OutT><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
          p, static_cast<OutT*>(out), static_cast<uint32_t>(cpr), div_magic(static_cast<uint32_t>(cpr)),
          static_cast<uint32_t>(n_chunks), log2_exact(p.group_size), static_cast<uint64_t>(p.rows) * p.row_bytes);
    });
  }
  const int threads = 256;
  const int64_t grid = (n_chunks + threads * 4 - 1) / (threads * 4);
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return with_out_type(out_dtype, [&](auto tag) {
    using OutT = decltype(tag);
    intg_dequant_kernel<B, OFFSET, OutT><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
        p, static_cast<OutT*>(out), cpr, n_chunks, aligned_load, vec_store);
  });
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
