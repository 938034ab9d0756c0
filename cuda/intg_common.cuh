// intg-v1 device helpers shared by intg_dequant.cu and intg_gemv.cu (split so they compile in parallel).
#pragma once

#include "common.cuh"

namespace lowbit {
namespace intg {

// Group parameters of one (row, group): scale, and zero (as 2^23 + z, see magic_u2f) or offset.
template <bool OFFSET>
__device__ __forceinline__ void group_params(const IntgParams& p, int64_t row, int64_t g, float& s, float& z) {
  const int64_t i = row * p.n_groups + g;
  s = load_as_float(p.scale, p.scale_dtype, i);
  if constexpr (OFFSET) z = load_as_float(p.offset, p.offset_dtype, i);
  else z = kMagic + static_cast<float>(__ldg(p.zero + i));  // exact: both are integers < 2^24
}

template <bool OFFSET>
__device__ __forceinline__ float dequant_one(uint32_t q, float s, float z) {
  // __f*_rn: never contracted into an FMA, so the result is the reference's to the bit.
  if constexpr (OFFSET) return __fadd_rn(__fmul_rn(__fsub_rn(magic_u2f(q), kMagic), s), z);
  else return __fmul_rn(__fsub_rn(magic_u2f(q), z), s);
}

// Raw bits of element i of a float tensor of run-time dtype, and their value: split so a prefetch can
// issue the load one iteration before anything waits on it.
__device__ __forceinline__ uint32_t load_bits(const void* base, int dtype, int64_t i) {
  if (dtype == kF32) return __ldg(static_cast<const uint32_t*>(base) + i);
  return __ldg(static_cast<const uint16_t*>(base) + i);
}
__device__ __forceinline__ float bits_to_float(uint32_t b, int dtype) {
  if (dtype == kF32) return __uint_as_float(b);
  if (dtype == kF16) return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  return __uint_as_float(b << 16);  // bf16 -> fp32 is exact
}

__device__ __forceinline__ int64_t group_of(const IntgParams& p, int64_t col) {
  return p.g_idx ? static_cast<int64_t>(__ldg(p.g_idx + col)) : col / p.group_size;
}

// Code of (row, col) read byte by byte (any alignment, any bit width).
template <int B>
__device__ __forceinline__ uint32_t code_at(const IntgParams& p, int64_t row, int64_t col) {
  const int64_t bit = col * B;
  const uint8_t* rp = p.qweight + row * p.row_bytes + (bit >> 3);
  const int off = static_cast<int>(bit & 7);
  uint32_t v = __ldg(rp);
  if (off + B > 8) v |= static_cast<uint32_t>(__ldg(rp + 1)) << 8;  // the code's bits lie inside the row
  return (v >> off) & ((1u << B) - 1u);
}

}  // namespace intg
}  // namespace lowbit
