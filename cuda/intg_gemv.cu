// Layout intg-v1 (lowbitpack/layouts/intg.py): fused dequant-GEMV (core in gemv_core.cuh).
//
// Reference arithmetic (fp32, then one rounding to the output dtype):
//   zero mode:   w = (q - z) * s        offset mode:  w = q * s + m
// q is the code (exact in fp32), z the uint8 zero, s / m the group's scale / offset read as fp32.

#include "gemv_core.cuh"
#include "intg_common.cuh"

namespace lowbit {
namespace {
using namespace intg;

// ---------------------------------------------------------------- GEMV decoder
// UNIFORM: no g_idx and group_size % 32 == 0, so a 32-code chunk has one (scale, zero): hoisted per chunk.
template <int B, bool OFFSET, bool UNIFORM>
struct IntgDecoder {
  static constexpr int kWords = B;  // 32 codes of B bits = B words
  static constexpr int kSmemFloats = 0;
  IntgParams p;
  bool aligned;  // cols % 32 == 0 and a 16-byte aligned base: every chunk is whole and vector-aligned

  int g_shift;   // log2(group_size) when a power of two, else -1

  struct Raw { uint32_t w[B]; uint32_t s_bits, z_bits; };
  struct State { float s, z; };

  __device__ __forceinline__ void prologue(float*, int64_t) const {}
  __host__ __device__ __forceinline__ int64_t rows() const { return p.rows; }
  __host__ __device__ __forceinline__ int64_t cols() const { return p.cols; }
  __device__ __forceinline__ int64_t out_rows() const { return p.rows; }
  __device__ __forceinline__ int64_t out_row(int64_t r) const { return r; }
  __device__ __forceinline__ bool fast_ok(int64_t col_end) const { return aligned && col_end <= p.cols; }

  __device__ __forceinline__ void fetch(int64_t row, int64_t col0, Raw& r) const {
    const uint8_t* ptr = p.qweight + row * p.row_bytes + (col0 >> 3) * B;
    if constexpr (B % 4 == 0) {
#pragma unroll
      for (int i = 0; i < B / 4; ++i) {
        uint4 v = ldg_stream16(ptr + 16 * i);
        r.w[4 * i] = v.x; r.w[4 * i + 1] = v.y; r.w[4 * i + 2] = v.z; r.w[4 * i + 3] = v.w;
      }
    } else if constexpr (B == 2) {
      uint2 v = __ldg(reinterpret_cast<const uint2*>(ptr));
      r.w[0] = v.x; r.w[1] = v.y;
    } else {
#pragma unroll
      for (int i = 0; i < B; ++i) r.w[i] = __ldg(reinterpret_cast<const uint32_t*>(ptr) + i);
    }
    if constexpr (UNIFORM) {
      // cols < 2^31 (checked by the launcher): 32-bit index math, a shift for power-of-two groups.
      const uint32_t c0 = static_cast<uint32_t>(col0);
      const int64_t i = row * p.n_groups + (g_shift >= 0 ? (c0 >> g_shift) : c0 / static_cast<uint32_t>(p.group_size));
      r.s_bits = load_bits(p.scale, p.scale_dtype, i);
      if constexpr (OFFSET) r.z_bits = load_bits(p.offset, p.offset_dtype, i);
      else r.z_bits = __ldg(p.zero + i);
    } else {
      r.s_bits = r.z_bits = 0u;
    }
  }

  __device__ __forceinline__ State state(const Raw& r, int64_t, int, int64_t, const float*) const {
    State st{0.f, 0.f};
    if constexpr (UNIFORM) {
      st.s = bits_to_float(r.s_bits, p.scale_dtype);
      if constexpr (OFFSET) st.z = bits_to_float(r.z_bits, p.offset_dtype);
      else st.z = kMagic + static_cast<float>(r.z_bits);  // exact: both are integers < 2^24
    }
    return st;
  }

  // 2^23 + code c (0..31) of the chunk, as a float (the magic_u2f convention).
  __device__ __forceinline__ static float code_magic(const uint32_t (&w)[B], int c) {
    if constexpr (B == 2 || B == 4 || B == 8) {
      // One mask per word and shift (shared by the unrolled decode8 calls), then one PRMT per code.
      return magic_byte(code_bytes<B>(w, c), static_cast<int>(code_byte_index<B>(c)));
    } else {
      const int bit = c * B, wi = bit >> 5, off = bit & 31;
      uint32_t q = w[wi] >> off;
      if (off + B > 32) q = __funnelshift_r(w[wi], w[wi + 1], off);  // straddles two words
      return __uint_as_float((q & ((1u << B) - 1u)) | 0x4B000000u);   // one LOP3
    }
  }

  __device__ __forceinline__ void decode8(const uint32_t (&w)[B], const State& st, int i, int64_t row,
                                          int64_t col0, const float*, float (&out)[8]) const {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int c = 8 * i + k;
      const float f = code_magic(w, c);  // 2^23 + q
      float s = st.s, z = st.z;
      if constexpr (!UNIFORM) group_params<OFFSET>(p, row, group_of(p, col0 + c), s, z);
      // Same operations as dequant_one: (q - z) * s, or q * s + m, each rounded, never contracted.
      if constexpr (OFFSET) out[k] = __fadd_rn(__fmul_rn(__fsub_rn(f, kMagic), s), z);
      else out[k] = __fmul_rn(__fsub_rn(f, z), s);
    }
  }

  __device__ __forceinline__ float value_slow(int64_t row, int64_t col, const float*) const {
    float s, z;
    group_params<OFFSET>(p, row, group_of(p, col), s, z);
    return dequant_one<OFFSET>(code_at<B>(p, row, col), s, z);
  }
};

template <int B, bool OFFSET, bool UNIFORM>
cudaError_t gemv_u(const IntgParams& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream) {
  IntgDecoder<B, OFFSET, UNIFORM> dec;
  dec.p = p;
  dec.aligned = (p.cols % 32 == 0) && (reinterpret_cast<uintptr_t>(p.qweight) % 16 == 0);
  dec.g_shift = log2_exact(p.group_size);
  const bool x_vec = (p.cols % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0);
  return launch_gemv(dec, x, m, x_dtype, y, x_vec, stream);
}

template <int B, bool OFFSET>
cudaError_t gemv_b(const IntgParams& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream) {
  const bool uniform = (p.g_idx == nullptr) && (p.group_size % 32 == 0);
  return uniform ? gemv_u<B, OFFSET, true>(p, x, m, x_dtype, y, stream)
                 : gemv_u<B, OFFSET, false>(p, x, m, x_dtype, y, stream);
}

template <int B>
cudaError_t gemv_bits(const IntgParams& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream) {
  return p.offset ? gemv_b<B, true>(p, x, m, x_dtype, y, stream) : gemv_b<B, false>(p, x, m, x_dtype, y, stream);
}

}  // namespace

cudaError_t intg_gemv(const IntgParams& p, const void* x, int64_t m, int x_dtype, void* y, cudaStream_t stream) {
  if (m < 1 || m > 8 || p.cols >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  switch (p.bits) {
    case 2: return gemv_bits<2>(p, x, m, x_dtype, y, stream);
    case 3: return gemv_bits<3>(p, x, m, x_dtype, y, stream);
    case 4: return gemv_bits<4>(p, x, m, x_dtype, y, stream);
    case 8: return gemv_bits<8>(p, x, m, x_dtype, y, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lowbit
