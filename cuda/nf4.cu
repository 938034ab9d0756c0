// Layout nf4-bnb-v1: bitsandbytes' NF4 bytes (two codes a byte, high nibble = even element, flat over
// the row-major tensor), absmax per block of `blocksize`, optionally double-quantized.
//
// Reference arithmetic (bitsandbytes, and lowbitpack/layouts/nf4.py), all fp32:
//   absmax[b] = nested_map[absmax_code[b]] * nested_absmax[b / nested_blocksize] + offset
//   w[i]      = quant_map[code_i] * absmax[i / blocksize], rounded once to the output dtype.
#include "gemv_core.cuh"

namespace lowbit {
namespace {

__device__ __forceinline__ float block_absmax(const Nf4Params& p, int64_t b) {
  if (p.absmax) return __ldg(p.absmax + b);
  const float code = __ldg(p.nested_map + __ldg(p.absmax_code + b));
  return double_quant_absmax(code, __ldg(p.nested_absmax + b / p.nested_blocksize), p.offset);
}

// ---------------------------------------------------------------- dequantize
// One sub-chunk = 8 codes = 4 bytes: one 4-byte load and one 16-byte store (16-bit outputs), so a warp's
// loads and stores are contiguous (a 32-byte run per thread would write half sectors per instruction:
// measured 30% slower). Each thread does kSub sub-chunks spaced blockDim apart, all loads issued before
// any use. blocksize is a multiple of 8 (bitsandbytes allows 32..4096): one absmax per sub-chunk. Both
// code tables sit in shared memory, so the absmax chain costs one global latency, not two.
constexpr int kSub = 8;

template <typename OutT>
__global__ void __launch_bounds__(256) nf4_dequant_kernel(const Nf4Params p, OutT* __restrict__ out,
                                                          int64_t numel, bool vec_store) {
  __shared__ float lut[16 + 256];
  for (int i = threadIdx.x; i < 16 + 256; i += blockDim.x) {
    if (i < 16) lut[i] = p.quant_map[i];
    else if (p.nested_map) lut[i] = p.nested_map[i - 16];
  }
  __syncthreads();
  const int64_t n_chunks = (numel + 7) / 8;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * kSub + threadIdx.x;
  uint32_t raw[kSub], code[kSub];
  float scale[kSub];
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
    const int64_t sc = base + static_cast<int64_t>(u) * blockDim.x;
    raw[u] = 0u;
    code[u] = 0u;
    scale[u] = 0.f;
    if (sc < n_chunks) {
      if (sc * 8 + 8 <= numel) {
        raw[u] = __ldg(reinterpret_cast<const unsigned int*>(p.packed) + sc);
      } else {
        const int nbytes = static_cast<int>((numel - sc * 8 + 1) / 2);
        for (int i = 0; i < nbytes; ++i) raw[u] |= static_cast<uint32_t>(__ldg(p.packed + sc * 4 + i)) << (8 * i);
      }
      const int64_t b = (sc * 8) / p.blocksize;
      if (p.absmax) {
        scale[u] = __ldg(p.absmax + b);
      } else {
        code[u] = __ldg(p.absmax_code + b);
        scale[u] = __ldg(p.nested_absmax + b / p.nested_blocksize);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kSub; ++u) {
    const int64_t sc = base + static_cast<int64_t>(u) * blockDim.x;
    if (sc >= n_chunks) break;
    const float am = p.absmax ? scale[u] : double_quant_absmax(lut[16 + code[u]], scale[u], p.offset);
    float v[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = (raw[u] >> (8 * i)) & 0xFFu;
      v[2 * i] = __fmul_rn(lut[byte >> 4], am);
      v[2 * i + 1] = __fmul_rn(lut[byte & 15u], am);
    }
    store8<OutT>(out + sc * 8, v, vec_store, static_cast<int>(imin64(8, numel - sc * 8)));
  }
}

// ---------------------------------------------------------------- GEMV decoder
struct Nf4Decoder {
  static constexpr int kWords = 4;                // 32 codes = 16 bytes
  static constexpr int kSmemFloats = 16 + 256;    // quant_map, nested map
  Nf4Params p;
  bool aligned;  // cols % 32 == 0, blocksize % 32 == 0, 16-byte aligned base: whole aligned chunks, one absmax
  int bs_shift, nbs_shift;  // log2 of the block sizes, -1 when not a power of two

  struct Raw { uint32_t w[4]; uint32_t code; float scale; };  // scale: nested absmax, or the fp32 absmax
  struct State { float am; uint32_t lut; };                   // lut: shared address of quant_map (low byte 0)

  __device__ __forceinline__ void prologue(float* smem, int64_t) const {
    for (int i = threadIdx.x; i < 16 + 256; i += blockDim.x) {
      if (i < 16) smem[i] = p.quant_map[i];
      else if (p.nested_map) smem[i] = p.nested_map[i - 16];
    }
  }
  __host__ __device__ __forceinline__ int64_t rows() const { return p.rows; }
  __host__ __device__ __forceinline__ int64_t cols() const { return p.cols; }
  __device__ __forceinline__ int64_t out_rows() const { return p.rows; }
  __device__ __forceinline__ int64_t out_row(int64_t r) const { return r; }
  __device__ __forceinline__ bool fast_ok(int64_t col_end) const { return aligned && col_end <= p.cols; }

  __device__ __forceinline__ void fetch(int64_t row, int64_t col0, Raw& r) const {
    const int64_t idx = row * p.cols + col0;
    uint4 v = ldg_stream16(p.packed + (idx >> 1));
    r.w[0] = v.x; r.w[1] = v.y; r.w[2] = v.z; r.w[3] = v.w;
    const int64_t b = bs_shift >= 0 ? (idx >> bs_shift) : idx / p.blocksize;
    if (p.absmax) {
      r.scale = __ldg(p.absmax + b);
      r.code = 0;
    } else {
      r.code = __ldg(p.absmax_code + b);
      r.scale = __ldg(p.nested_absmax + (nbs_shift >= 0 ? (b >> nbs_shift) : b / p.nested_blocksize));
    }
  }

  __device__ __forceinline__ State state(const Raw& r, int64_t, int, int64_t, const float* smem) const {
    const uint32_t lut = smem_addr(smem);
    if (p.absmax) return State{r.scale, lut};
    return State{double_quant_absmax(smem[16 + r.code], r.scale, p.offset), lut};
  }

  // Codes 8i .. 8i+7 of the chunk = bytes 4i .. 4i+3; even element in the high nibble. Per code: one PRMT
  // that puts 4*code into the low byte of the (256-byte aligned) table address, one LDS, one FMUL.
  __device__ __forceinline__ void decode8(const uint32_t (&w)[4], const State& st, int i, int64_t, int64_t,
                                          const float*, float (&out)[8]) const {
    const uint32_t hi = (w[i] >> 2) & 0x3C3C3C3Cu;  // 4 * (even element) in each byte
    const uint32_t lo = (w[i] << 2) & 0x3C3C3C3Cu;  // 4 * (odd element)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      out[2 * b] = __fmul_rn(lds_f32(prmt(hi, st.lut, 0x7650u | b)), st.am);
      out[2 * b + 1] = __fmul_rn(lds_f32(prmt(lo, st.lut, 0x7650u | b)), st.am);
    }
  }

  __device__ __forceinline__ float value_slow(int64_t row, int64_t col, const float* lut) const {
    const int64_t idx = row * p.cols + col;
    const uint32_t byte = __ldg(p.packed + (idx >> 1));
    const uint32_t q = (idx & 1) ? (byte & 15u) : (byte >> 4);
    return __fmul_rn(lut[q], block_absmax(p, idx / p.blocksize));
  }
};

}  // namespace

cudaError_t nf4_dequant(const Nf4Params& p, void* out, int out_dtype, cudaStream_t stream) {
  if (p.blocksize % 8 != 0) return cudaErrorInvalidValue;
  const int64_t numel = p.rows * p.cols;
  const int64_t n_chunks = (numel + 7) / 8;
  if (n_chunks == 0) return cudaSuccess;
  const bool vec_store = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (reinterpret_cast<uintptr_t>(p.packed) % 4 != 0) return cudaErrorMisalignedAddress;
  const int threads = 256;
  const int64_t grid = (n_chunks + threads * kSub - 1) / (threads * kSub);
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return with_out_type(out_dtype, [&](auto tag) {
    using OutT = decltype(tag);
    nf4_dequant_kernel<OutT><<<static_cast<unsigned>(grid), threads, 0, stream>>>(p, static_cast<OutT*>(out), numel,
                                                                                  vec_store);
  });
}

cudaError_t nf4_gemv(const Nf4Params& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream) {
  if (m < 1 || m > 8) return cudaErrorInvalidValue;
  Nf4Decoder dec;
  dec.p = p;
  dec.aligned = (p.cols % 32 == 0) && (p.blocksize % 32 == 0) && (reinterpret_cast<uintptr_t>(p.packed) % 16 == 0);
  dec.bs_shift = log2_exact(p.blocksize);
  dec.nbs_shift = log2_exact(p.nested_blocksize);
  const bool x_vec = (p.cols % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0);
  return launch_gemv(dec, x, m, x_dtype, y, x_vec, stream);
}

}  // namespace lowbit
