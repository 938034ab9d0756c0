// NF4 pair-table GEMV experiments without the torch extension (bench/gemv_exp.sh builds it; it runs on the GPU
// machine as `build/gemv_exp/gemv_exp ROWS COLS M VARIANT[,VARIANT...]`).
//
// A VARIANT is LOWBITPACK_NF4_SK's value (cuda/nf4_gemv.cu: ring16s6r, ring16s6ra, tile8, off, ...; `default` leaves it
// unset: the plan's choice) with optional `/key=value` settings, LOWBITPACK_NF4_SK_<KEY>: `/pdl=0` (a plain launch
// instead of programmatic dependent launch), `/mode=1|2` (the ring16s6[r] tuning builds), `/xsmem=0` (x in global
// memory). For each it prints the plan, checks the result against a float64 product of the weights the pair-table
// kernels multiply by (r(quant_map[q]) in bf16, times the fp32 absmax) and bit for bit against the first variant, then
// times a CUDA graph of back-to-back calls over rotating copies of the weight (L2 holds none of them): the same method
// as bench/kernels.py. Weights are random NF4 codes with double-quantized absmax (blocksize 64, nested blocksize 256),
// or with GEMV_EXP_DATA=DIR the bitsandbytes-quantized normals bench/gemv_exp_data.py wrote there (what
// bench/kernels.py times; random codes flattered a kernel once: docs/KERNELS.md, session 9). x is bf16.
// GEMV_EXP_INNER / GEMV_EXP_COPIES override the calls per graph (40) and the weight copies (over 400 MB).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cctype>
#include <cstring>
#include <string>
#include <vector>

#include "../cuda/lowbit_kernels.h"
#include "bench_cuda.cuh"

static const float kNf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                               -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                               0.07958029955625534f, 0.16093020141124725f, 0.24611230731010437f, 0.33791524171829224f,
                               0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

__global__ void fill_random(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = static_cast<uint8_t>(h >> 8);
  }
}

// y[n][r] = sum_k bf16(qm[q_rk]) * absmax(r, k) * x[n][k], in float64: one block per row.
__global__ void reference(const uint8_t* packed, const float* qm, const uint8_t* code, const float* nmap,
                          const float* nabs, float offset, const __nv_bfloat16* x, int m, int64_t rows, int64_t cols,
                          double* y) {
  const int64_t r = blockIdx.x;
  for (int n = 0; n < m; ++n) {
    double s = 0;
    for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
      const int64_t e = r * cols + k;
      const uint8_t byte = packed[e >> 1];
      const int q = (e & 1) ? (byte & 15) : (byte >> 4);
      const int64_t b = e >> 6;
      const float am = __fadd_rn(__fmul_rn(nmap[code[b]], nabs[b >> 8]), offset);
      const double w = __bfloat162float(__float2bfloat16_rn(qm[q]));
      s += w * am * __bfloat162float(x[n * cols + k]);
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    __shared__ double part[32];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      double t = 0;
      for (int w = 0; w < (int)blockDim.x / 32; ++w) t += part[w];
      y[n * rows + r] = t;
    }
    __syncthreads();
  }
}

#ifdef LOWBIT_RING_TRACE
namespace lowbit {
void ring_trace_dump(int blocks);  // cuda/nf4_gemv.cu, built with LOWBIT_RING_TRACE (bench/gemv_exp.sh trace)
}
#endif

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? atoll(argv[1]) : 14336, cols = argc > 2 ? atoll(argv[2]) : 4096;
  const int m = argc > 3 ? atoi(argv[3]) : 1;
  const std::string list = argc > 4 ? argv[4] : "ring16s6r";
  const int reps = argc > 5 ? atoi(argv[5]) : 30;
  std::vector<std::string> variants;
  for (size_t a = 0, b; a <= list.size(); a = b + 1) {
    b = list.find(',', a);
    if (b == std::string::npos) b = list.size();
    if (b > a) variants.push_back(list.substr(a, b - a));
  }
  const int64_t numel = rows * cols, n_blocks = numel / 64, n_nested = (n_blocks + 255) / 256;
  const size_t per_copy = numel / 2 + n_blocks + n_nested * 4;
  // GEMV_EXP_COPIES and GEMV_EXP_INNER override the weight copies (default: over 400 MB) and the calls a graph replays
  // (default 40); bench/kernels.py uses 4 x L2 / size copies and 20 calls.
  const char* copies_env = std::getenv("GEMV_EXP_COPIES");
  const int copies = copies_env ? std::max(1, atoi(copies_env))
                                : static_cast<int>(std::max<int64_t>(2, (400LL << 20) / per_copy + 1));
  std::vector<uint8_t*> packed(copies), code(copies);
  std::vector<float*> nabs(copies);
  for (int c = 0; c < copies; ++c) {
    CK(cudaMalloc(&packed[c], numel / 2));
    CK(cudaMalloc(&code[c], n_blocks));
    CK(cudaMalloc(&nabs[c], n_nested * 4));
    fill_random<<<1024, 256>>>(packed[c], numel / 2, 17u * c + 1);
    fill_random<<<1024, 256>>>(code[c], n_blocks, 1000u + c);
    std::vector<float> h(n_nested);
    for (int64_t i = 0; i < n_nested; ++i) h[i] = 0.01f + 0.05f * ((i * 7919 + c * 31) % 1000) / 1000.f;
    CK(cudaMemcpy(nabs[c], h.data(), n_nested * 4, cudaMemcpyHostToDevice));
  }
  float *qm, *nmap;
  CK(cudaMalloc(&qm, 64));
  CK(cudaMemcpy(qm, kNf4, 64, cudaMemcpyHostToDevice));
  std::vector<float> hn(256);
  for (int i = 0; i < 256; ++i) hn[i] = -1.f + 2.f * i / 255.f;
  CK(cudaMalloc(&nmap, 1024));
  CK(cudaMemcpy(nmap, hn.data(), 1024, cudaMemcpyHostToDevice));
  std::vector<__nv_bfloat16> hx(m * cols);
  for (int64_t i = 0; i < m * cols; ++i) hx[i] = __float2bfloat16(std::sin(0.37 * i) * 2.f);
  __nv_bfloat16 *x, *y;
  CK(cudaMalloc(&x, m * cols * 2));
  CK(cudaMemcpy(x, hx.data(), m * cols * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&y, 2 * m * rows));
  double* yref;
  CK(cudaMalloc(&yref, 8 * m * rows));
  float offset = 0.02f;
  // GEMV_EXP_DATA=DIR: the weight bench/gemv_exp_data.py wrote (standard normals quantized like bitsandbytes, as
  // bench/kernels.py times) in every copy instead of random codes.
  if (const char* dir = std::getenv("GEMV_EXP_DATA")) {
    const auto load = [&](const char* name, void* dst, size_t bytes) {
      const std::string path = std::string(dir) + "/" + name;
      FILE* f = std::fopen(path.c_str(), "rb");
      std::vector<uint8_t> h(bytes);
      if (!f || std::fread(h.data(), 1, bytes, f) != bytes) {
        std::fprintf(stderr, "%s: missing or shorter than %zu bytes (bench/gemv_exp_data.py %lld %lld %s)\n", path.c_str(),
                     bytes, (long long)rows, (long long)cols, dir);
        std::exit(1);
      }
      std::fclose(f);
      CK(cudaMemcpy(dst, h.data(), bytes, cudaMemcpyHostToDevice));
    };
    load("packed.bin", packed[0], numel / 2);
    load("code.bin", code[0], n_blocks);
    load("nabs.bin", nabs[0], n_nested * 4);
    for (int c = 1; c < copies; ++c) {  // the other copies from the first, on the device
      CK(cudaMemcpy(packed[c], packed[0], numel / 2, cudaMemcpyDeviceToDevice));
      CK(cudaMemcpy(code[c], code[0], n_blocks, cudaMemcpyDeviceToDevice));
      CK(cudaMemcpy(nabs[c], nabs[0], n_nested * 4, cudaMemcpyDeviceToDevice));
    }
    load("qm.bin", qm, 64);
    load("nmap.bin", nmap, 1024);
    FILE* f = std::fopen((std::string(dir) + "/offset.txt").c_str(), "r");
    double o = 0;
    if (!f || std::fscanf(f, "%lf", &o) != 1) {
      std::fprintf(stderr, "%s/offset.txt: unreadable\n", dir);
      std::exit(1);
    }
    std::fclose(f);
    offset = static_cast<float>(o);
    printf("data from %s (offset %.6f)\n", dir, offset);
  }
  reference<<<rows, 256>>>(packed[0], qm, code[0], nmap, nabs[0], offset, x, m, rows, cols, yref);
  CK(cudaDeviceSynchronize());
  std::vector<double> ref(m * rows);
  CK(cudaMemcpy(ref.data(), yref, 8 * m * rows, cudaMemcpyDeviceToHost));
  double ref_max = 0;
  for (double v : ref) ref_max = std::max(ref_max, std::fabs(v));

  const auto params = [&](int c) {
    lowbit::Nf4Params p{};
    p.packed = packed[c];
    p.quant_map = qm;
    p.blocksize = 64;
    p.absmax = nullptr;
    p.absmax_code = code[c];
    p.nested_map = nmap;
    p.nested_absmax = nabs[c];
    p.nested_blocksize = 256;
    p.offset = offset;
    p.rows = rows;
    p.cols = cols;
    return p;
  };
  printf("device copy: %.0f GB/s\n", device_copy_ceiling().second);  // in the same run
  printf("shape %lldx%lld m=%d, %d weight copies of %.1f MB\n", (long long)rows, (long long)cols, m, copies,
         per_copy / 1e6);

  std::vector<uint16_t> first(m * rows), out(m * rows);
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  for (size_t vi = 0; vi < variants.size(); ++vi) {
    // NAME[/key=value...]: LOWBITPACK_NF4_SK=NAME and LOWBITPACK_NF4_SK_<KEY>=value (pdl, mode, xsmem; unset
    // when not given), as bench/kernels.py --nf4-variants.
    std::string name = variants[vi];
    for (const char* k : {"PDL", "MODE", "XSMEM"}) unsetenv((std::string("LOWBITPACK_NF4_SK_") + k).c_str());
    for (size_t slash; (slash = name.rfind('/')) != std::string::npos; name = name.substr(0, slash)) {
      std::string opt = name.substr(slash + 1), key = opt.substr(0, opt.find('='));
      for (char& c : key) c = static_cast<char>(toupper(c));
      setenv(("LOWBITPACK_NF4_SK_" + key).c_str(), opt.substr(opt.find('=') + 1).c_str(), 1);
    }
    if (name == "default") unsetenv("LOWBITPACK_NF4_SK");  // the plan's own choice
    else setenv("LOWBITPACK_NF4_SK", name.c_str(), 1);
    const auto p0 = params(0);
    const lowbit::Nf4GemvPlan plan = lowbit::nf4_gemv_plan(p0, m, lowbit::kBF16, x);
    const auto launch = [&](int c) {
      const auto p = params(c);
      if (plan.ok) return lowbit::nf4_gemv_sk(p, plan, x, m, lowbit::kBF16, y, nullptr, nullptr, st);
      return lowbit::nf4_gemv(p, x, m, lowbit::kBF16, y, st);
    };
    if (plan.ok && plan.partial_floats) {
      printf("%-22s stream-K needs scratch: skipped\n", variants[vi].c_str());
      continue;
    }
    CK(launch(0));
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(out.data(), y, 2 * m * rows, cudaMemcpyDeviceToHost));
    double err = 0;
    for (int64_t i = 0; i < m * rows; ++i) {
      uint32_t bits = static_cast<uint32_t>(out[i]) << 16;
      float v;
      memcpy(&v, &bits, 4);
      err = std::max(err, std::fabs(v - ref[i]));
    }
    if (vi == 0) first = out;
    const bool same = out == first;
    // Graph of `inner` back-to-back calls over the rotating copies.
    const char* inner_env = std::getenv("GEMV_EXP_INNER");
    const int inner = inner_env ? std::max(1, atoi(inner_env)) : 40;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < inner; ++i) CK(launch(i % copies));
    CK(cudaStreamEndCapture(st, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> ts;
    for (int r = 0; r < reps + 3; ++r) {
      CK(cudaEventRecord(e0, st));
      CK(cudaGraphLaunch(exec, st));
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r >= 3) ts.push_back(ms * 1e3f / inner);
    }
    std::sort(ts.begin(), ts.end());
    printf("%-22s form %d row-copies %d absmax-slots %d pdl %d blocks %d: %7.2f us (min %.2f max %.2f)  err %.2e  %s\n",
           variants[vi].c_str(), plan.form, plan.row_copies, plan.tile_absmax, plan.pdl, plan.blocks, ts[ts.size() / 2],
           ts.front(), ts.back(), err / ref_max, vi == 0 ? "(reference bits)" : same ? "same bits" : "BITS DIFFER");
#ifdef LOWBIT_RING_TRACE
    if (plan.ok && plan.form == lowbit::kNf4Ring) lowbit::ring_trace_dump(plan.blocks);
#endif
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
  }
  return 0;
}
