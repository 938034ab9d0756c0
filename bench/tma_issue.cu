// What a bulk copy (cp.async.bulk, the ring GEMV's producer) costs to issue and to land, by copy size and by how
// many SMs copy at once (bench/tma_issue.cu; sm_90):
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/tma_issue bench/tma_issue.cu && /tmp/tma_issue
// One warp per block issues N copies of S bytes into shared memory, completing on one mbarrier. Each copy reads its
// own row of a row-major buffer (rows 8 KB apart), like the ring producer's row copies (at 14336x4096 a stage is
// 1 KB of each of 16 rows 2 KB apart).
// Per block it stamps clock64 before the first copy, after the last one is issued, and when the barrier completes;
// the table gives the means over blocks. Every launch reads a fresh 64 MB region (L2 holds none of it).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                       \
  do {                                                                              \
    cudaError_t e = (x);                                                            \
    if (e != cudaSuccess) {                                                         \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// mode 0: lane r issues copy r (the compiler serializes the lanes, as in the ring kernel); mode 1: lane 0 issues
// them all in a loop; mode 2: n warps, lane 0 of warp r issues copy r (the block has n warps).
__global__ void issue(const uint8_t* __restrict__ w, int64_t row_stride, int bytes, int n, int mode,
                      unsigned long long* out) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t bar;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t b = smem_u32(&bar), dst0 = smem_u32(smem);
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const uint8_t* src = w + static_cast<int64_t>(blockIdx.x) * n * row_stride;
  const unsigned long long t0 = clock64();
  if (threadIdx.x == 0)
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(n * bytes) : "memory");
  __syncthreads();
  if (mode == 2) {
    if (lane == 0)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                       dst0 + warp * bytes),
                   "l"(src + warp * row_stride), "r"(bytes), "r"(b)
                   : "memory");
  } else if (mode == 0) {
    if (lane < n)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                       dst0 + lane * bytes),
                   "l"(src + lane * row_stride), "r"(bytes), "r"(b)
                   : "memory");
  } else if (lane == 0) {
    for (int r = 0; r < n; ++r)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                       dst0 + r * bytes),
                   "l"(src + r * row_stride), "r"(bytes), "r"(b)
                   : "memory");
  }
  __syncthreads();
  const unsigned long long t1 = clock64();
  asm volatile(
      "{\n\t.reg .pred done;\nW:\n\tmbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n\t@!done bra W;\n}" ::"r"(b)
      : "memory");
  const unsigned long long t2 = clock64();
  if (threadIdx.x == 0) {
    out[3 * blockIdx.x + 0] = t1 - t0;
    out[3 * blockIdx.x + 1] = t2 - t0;
    out[3 * blockIdx.x + 2] = smem[lane];  // keep the copy
  }
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t region = 64ll << 20, stride = 8192;
  const int n_regions = 16;
  uint8_t* w = nullptr;
  CK(cudaMalloc(&w, region * n_regions));
  CK(cudaMemset(w, 1, region * n_regions));
  unsigned long long* out = nullptr;
  CK(cudaMalloc(&out, 3 * sizeof(unsigned long long) * sms));
  CK(cudaFuncSetAttribute(issue, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  std::vector<unsigned long long> h(3 * sms);
  int launch = 0;
  std::printf("%6s %6s %4s %5s %12s %12s %14s\n", "blocks", "bytes", "n", "mode", "issue clk", "landed clk",
              "issue clk/copy");
  for (int blocks : {1, sms})
    for (int mode : {0, 1, 2})
      for (int bytes : {256, 1024, 2048, 4096, 8192})
        for (int n : {1, 4, 16}) {
          if (static_cast<int64_t>(n) * bytes > 192 * 1024 || bytes > stride) continue;
          double is = 0, la = 0;
          const int reps = 5;
          for (int rep = 0; rep < reps; ++rep) {
            const uint8_t* src = w + (launch++ % n_regions) * region;
            issue<<<blocks, mode == 2 ? 32 * n : 32, n * bytes>>>(src, stride, bytes, n, mode, out);
            CK(cudaGetLastError());
            CK(cudaMemcpy(h.data(), out, 3 * sizeof(unsigned long long) * blocks, cudaMemcpyDeviceToHost));
            for (int i = 0; i < blocks; ++i) {
              is += h[3 * i];
              la += h[3 * i + 1];
            }
          }
          is /= reps * blocks;
          la /= reps * blocks;
          std::printf("%6d %6d %4d %5d %12.0f %12.0f %14.1f\n", blocks, bytes, n, mode, is, la, is / n);
        }
  return 0;
}
