// Device helpers shared by the lowbitpack kernels: dtype conversion with explicit rounding, loads,
// and the m16n8k16 tensor-core mma used by the fused GEMVs.
//
// Bit-exactness: the pure-torch references compute each weight in fp32 with separate multiply and add
// (each rounded) and round once to the output dtype. nvcc contracts a*b+c into one FMA unless told
// otherwise, so every multiply/add on the weight path goes through __fmul_rn / __fadd_rn / __fsub_rn,
// which are never contracted.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lowbit_kernels.h"

namespace lowbit {

// Load one element of a float tensor whose dtype is only known at run time (uniform branch).
__device__ __forceinline__ float load_as_float(const void* base, int dtype, int64_t i) {
  if (dtype == kF32) return __ldg(static_cast<const float*>(base) + i);
  if (dtype == kF16) return __half2float(__ldg(static_cast<const __half*>(base) + i));
  return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(base) + i));
}

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
  static __device__ __forceinline__ float to_float(float v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  // Two floats -> packed pair, low half = first (round to nearest even, like torch's .to()).
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Store 8 consecutive outputs; `vec` when the destination is 16-byte aligned.
template <typename OutT>
__device__ __forceinline__ void store8(OutT* dst, const float (&v)[8], bool vec, int valid) {
  if (vec && valid == 8) {
    if constexpr (sizeof(OutT) == 2) {
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        OutT lo = Cvt<OutT>::from(v[2 * i]);
        OutT hi = Cvt<OutT>::from(v[2 * i + 1]);
        w[i] = static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&lo)) |
               (static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&hi)) << 16);
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < valid) dst[i] = Cvt<OutT>::from(v[i]);
  }
}

// Exact int -> float for 0 <= q < 2^23 without the (slow) I2F unit: 2^23 + q has q in its mantissa.
__device__ __forceinline__ float magic_u2f(uint32_t q) { return __uint_as_float(0x4B000000u | q); }
constexpr float kMagic = 8388608.0f;  // 2^23

// 16-byte read-only load that does not allocate in L1: weights are streamed once.
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// __byte_perm: result byte i = byte sel.nibble[i] of the 8-byte {hi:lo} (0-3: lo, 4-7: hi). One PRMT.
__device__ __forceinline__ uint32_t prmt(uint32_t lo, uint32_t hi, uint32_t sel) { return __byte_perm(lo, hi, sel); }

// bitsandbytes' double-quantized absmax: the code's nested-map value times its block's nested absmax, plus the
// offset, in fp32 with this rounding order (the bits every NF4 kernel and the torch reference share).
__device__ __forceinline__ float double_quant_absmax(float map_value, float nested, float offset) {
  return __fadd_rn(__fmul_rn(map_value, nested), offset);
}

// fp32 load from a 32-bit shared-memory address (the address is built with one PRMT by the decoders).
// volatile: keeps it after the __syncthreads that publishes the table.
__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 2^23 + q for the byte `b` (0..3) of `bytes`, whose bytes each hold one code: one PRMT (bytes 1-3 of the
// result come from the constant 0x4B000000). With the magic_u2f convention below, exact for q < 256.
__device__ __forceinline__ float magic_byte(uint32_t bytes, int b) {
  return __uint_as_float(prmt(bytes, 0x4B000000u, 0x7650u | static_cast<uint32_t>(b)));
}

// Codes of B bits (B = 1, 2, 4, 8), LSB-first in 32-code chunks of B words. Code c of the chunk sits in
// byte code_byte_index<B>(c) of code_bytes<B>(w, c): (word >> B*k) & (mask in every byte) holds codes
// k, k + 8/B, ... of the word, one per byte. The masked words are the same for all codes that share a k,
// so in unrolled loops they cost about B/8 + 1/4 instructions per code.
template <int B>
__device__ __forceinline__ uint32_t code_bytes(const uint32_t (&w)[B], int c) {
  static_assert(B == 1 || B == 2 || B == 4 || B == 8, "byte-aligned widths only");
  constexpr int per_word = 32 / B, per_byte = 8 / B;
  const uint32_t word = w[c / per_word];
  const int k = (c % per_word) % per_byte;
  return (word >> (B * k)) & (0x01010101u * ((1u << B) - 1u));
}
template <int B>
__device__ __forceinline__ constexpr uint32_t code_byte_index(int c) {
  return static_cast<uint32_t>((c % (32 / B)) / (8 / B));
}

// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulate. Fragment ownership (PTX ISA, m16n8k16):
// lane = 4*g + t; a0:(row g, k 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..);
// b0:(k 2t..2t+1, n g) b1:(k 2t+8.., n g); c0,c1:(row g, n 2t, 2t+1) c2,c3:(row g+8, n 2t, 2t+1).
template <typename XT>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(XT) == 2 && std::is_same<XT, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the fused GEMVs need sm_80+; the Python side never launches them below that
#endif
}

// n / d for n < 2^32 and 2 <= d < 2^32 with one 64-bit high multiply instead of a ~20-instruction division:
// magic = ceil(2^64 / d) (host: div_magic), and floor(n * magic / 2^64) = floor(n / d) because the rounding
// adds less than n / 2^64 < 2^-32 < 1 / d. d = 1 passes magic 0 and divides by itself.
__device__ __forceinline__ uint32_t div_by_magic(uint32_t n, uint64_t magic) {
  return magic ? static_cast<uint32_t>(__umul64hi(static_cast<uint64_t>(n), magic)) : n;
}
inline uint64_t div_magic(uint32_t d) { return d < 2 ? 0 : (~uint64_t(0) / d) + 1; }

__host__ __device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

// Host: `launch(OutT{})` with OutT the C++ type of `out_dtype` (float, __half or __nv_bfloat16), then the
// launch's error; the three dequantize launchers pick their kernel's output type with it.
template <typename Launch>
cudaError_t with_out_type(int out_dtype, Launch&& launch) {
  switch (out_dtype) {
    case kF32: launch(float{}); break;
    case kF16: launch(__half{}); break;
    case kBF16: launch(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// log2(v) when v is a power of two, else -1 (kernels then divide).
inline int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1))) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

inline int div_up(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace lowbit
