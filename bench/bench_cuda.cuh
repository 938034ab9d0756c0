// Shared pieces of the standalone CUDA benchmarks (bench/dequant_exp.cu, bench/gemv_exp.cu): an error check,
// event timing and the device-copy ceiling they report beside their kernels.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                   \
  do {                                                                          \
    cudaError_t e = (x);                                                        \
    if (e != cudaSuccess) {                                                     \
      printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      exit(1);                                                                  \
    }                                                                           \
  } while (0)

// Median over `reps` of the mean time of `inner` launches, each on copy i % n.
template <typename F>
static double time_us(F&& launch, int n, int inner = 20, int reps = 15) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < n; ++i) launch(i);
  std::vector<double> ts;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a));
    for (int i = 0; i < inner; ++i) launch(i % n);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(1000.0 * ms / inner);
  }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// A 1 GiB device-to-device copy: (µs, GB/s counting bytes read plus bytes written), as bench/kernels.py reports it.
static std::pair<double, double> device_copy_ceiling() {
  const size_t n = size_t(1) << 30;
  void *a, *b;
  CK(cudaMalloc(&a, n));
  CK(cudaMalloc(&b, n));
  CK(cudaMemset(a, 1, n));
  const double t = time_us([&](int) { CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); }, 1, 10, 7);
  CK(cudaFree(a));
  CK(cudaFree(b));
  return {t, 2.0 * n / t / 1e3};
}
