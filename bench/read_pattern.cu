// Read-bandwidth ceiling of the GEMV weight access patterns, without any decode (bench/read_pattern.cu).
//   nvcc -O3 -arch=sm_90 -o /tmp/read_pattern bench/read_pattern.cu && /tmp/read_pattern 14336 4096
// A [rows, cols/2]-byte weight is read (a) as one flat stream, 16 B a thread; (b) like the generic GEMV:
// a block of W warps owns 16 rows, lane (g, t) reads 16 B of rows g and g + 8 at byte 64*it + 16t, warps
// interleaved over it, PF iterations in flight; (c) like the stream-K GEMV: a persistent warp walks its
// share of (tile, it) with 8-byte loads. Each pattern reads 4 rotating copies (L2 holds none of them).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

__device__ __forceinline__ uint4 ld16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__global__ void flat(const uint4* __restrict__ a, size_t n16, unsigned* out) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
    uint4 v = ld16(a + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) out[0] = acc;
}

template <int PF>
__global__ void generic_tile(const uint8_t* __restrict__ w, int rows, int cols, unsigned* out) {
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n_it = cols / 128;
  const size_t rb = cols / 2;
  const uint8_t* r0 = w + (size_t)min(blockIdx.x * 16 + g, rows - 1) * rb + 16 * t;
  const uint8_t* r1 = w + (size_t)min(blockIdx.x * 16 + g + 8, rows - 1) * rb + 16 * t;
  unsigned acc = 0;
  uint4 b0[PF], b1[PF];
#pragma unroll
  for (int i = 0; i < PF; ++i) {
    const int it = warp + i * warps;
    if (it < n_it) { b0[i] = ld16(r0 + 64 * it); b1[i] = ld16(r1 + 64 * it); }
  }
  for (int it = warp; it < n_it; it += PF * warps) {
#pragma unroll
    for (int i = 0; i < PF; ++i) {
      const int cur = it + i * warps;
      if (cur < n_it) {
        acc ^= b0[i].x ^ b0[i].y ^ b0[i].z ^ b0[i].w ^ b1[i].x ^ b1[i].y ^ b1[i].z ^ b1[i].w;
        const int nx = cur + PF * warps;
        if (nx < n_it) { b0[i] = ld16(r0 + 64 * nx); b1[i] = ld16(r1 + 64 * nx); }
      }
    }
  }
  if (acc == 0x12345678u) out[0] = acc;
}

template <int PF>
__global__ void streamk(const uint8_t* __restrict__ w, int rows, int cols, unsigned* out) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nw = gridDim.x * (blockDim.x >> 5), gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int n_it = cols / 128, total = ((rows + 15) / 16) * n_it;
  const int begin = (int)((long long)gw * total / nw), end = (int)((long long)(gw + 1) * total / nw);
  const size_t rb = cols / 2;
  unsigned acc = 0;
  uint2 b[PF][4];
  auto fetch = [&](int f, uint2 (&d)[4]) {
    const int tile = f / n_it, it = f % n_it;
    const uint8_t* p0 = w + (size_t)min(tile * 16 + g, rows - 1) * rb + 64 * it + 8 * t;
    const uint8_t* p1 = w + (size_t)min(tile * 16 + g + 8, rows - 1) * rb + 64 * it + 8 * t;
    d[0] = ld8(p0); d[1] = ld8(p0 + 32); d[2] = ld8(p1); d[3] = ld8(p1 + 32);
  };
#pragma unroll
  for (int i = 0; i < PF; ++i) if (begin + i < end) fetch(begin + i, b[i]);
  for (int f = begin; f < end; f += PF) {
#pragma unroll
    for (int i = 0; i < PF; ++i) {
      if (f + i < end) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc ^= b[i][k].x ^ b[i][k].y;
        if (f + i + PF < end) fetch(f + i + PF, b[i]);
      }
    }
  }
  if (acc == 0x12345678u) out[0] = acc;
}

template <typename F>
float time_it(F launch, int copies) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  for (int i = 0; i < 3 * copies; ++i) launch(i % copies);
  std::vector<float> ts;
  for (int r = 0; r < 15; ++r) {
    CK(cudaEventRecord(a));
    for (int i = 0; i < 20; ++i) launch(i % copies);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1000.f / 20);
  }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main(int argc, char** argv) {
  const int rows = argc > 1 ? atoi(argv[1]) : 14336, cols = argc > 2 ? atoi(argv[2]) : 4096;
  const size_t bytes = (size_t)rows * cols / 2;
  const int copies = 4;
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::vector<uint8_t*> w(copies);
  for (auto& p : w) { CK(cudaMalloc(&p, bytes)); CK(cudaMemset(p, 1, bytes)); }
  unsigned* out; CK(cudaMalloc(&out, 4));
  auto report = [&](const char* name, float us) { printf("%-28s %8.2f us %7.0f GB/s\n", name, us, bytes / (us * 1e3)); };
  printf("%dx%d: %.1f MB of codes\n", rows, cols, bytes / 1e6);
  report("flat 16B", time_it([&](int i) { flat<<<sms * 8, 256>>>((const uint4*)w[i], bytes / 16, out); }, copies));
  const int tiles = (rows + 15) / 16;
  report("generic 4 warps PF2", time_it([&](int i) { generic_tile<2><<<tiles, 128>>>(w[i], rows, cols, out); }, copies));
  report("generic 4 warps PF4", time_it([&](int i) { generic_tile<4><<<tiles, 128>>>(w[i], rows, cols, out); }, copies));
  report("generic 8 warps PF2", time_it([&](int i) { generic_tile<2><<<tiles, 256>>>(w[i], rows, cols, out); }, copies));
  report("streamk 24 warps PF1", time_it([&](int i) { streamk<1><<<sms, 768>>>(w[i], rows, cols, out); }, copies));
  report("streamk 24 warps PF2", time_it([&](int i) { streamk<2><<<sms, 768>>>(w[i], rows, cols, out); }, copies));
  report("streamk 16 warps PF4", time_it([&](int i) { streamk<4><<<sms, 512>>>(w[i], rows, cols, out); }, copies));
  report("streamk 32 warps PF4", time_it([&](int i) { streamk<4><<<sms, 1024>>>(w[i], rows, cols, out); }, copies));
  return 0;
}
