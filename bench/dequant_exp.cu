// Dequantize-kernel experiments without the torch extension (bench/dequant_exp.sh builds it).
// cuda/intg_dequant.cu and cuda/lowra.cu of the working tree (`new`) and of a git revision (`old`) are each
// compiled into their own object with the launchers renamed (-Dintg_dequant=intg_dequant_<v>, ...); `new` must
// match `old` bit for bit. (The session-5 runs in bench/results compared four builds of the working tree with
// -D switches that the chosen code no longer has; their variants are described there.) For a [rows, cols] weight (default 14336 x 4096, bf16 out, group 128, fp16 scales, uint8
// zeros) it times every variant over rotating copies of the inputs and outputs (L2 holds none of them) and
// prints GB/s (bytes read + written) next to a 1 GiB device copy and a write-only fill of the output.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../cuda/lowbit_kernels.h"
#include "bench_cuda.cuh"


using IntgFn = cudaError_t (*)(const lowbit::IntgParams&, void*, int, cudaStream_t);
using LowraFn = cudaError_t (*)(const lowbit::LowraParams&, void*, int, cudaStream_t);
using Nf4Fn = cudaError_t (*)(const lowbit::Nf4Params&, void*, int, cudaStream_t);

#define DECL(v)                                                                                   \
  namespace lowbit {                                                                              \
  cudaError_t intg_dequant_##v(const IntgParams&, void*, int, cudaStream_t);                     \
  cudaError_t lowra_dequant_##v(const LowraParams&, void*, int, cudaStream_t);                   \
  }
DECL(old)
DECL(new)
namespace lowbit {
cudaError_t nf4_dequant_old(const Nf4Params&, void*, int, cudaStream_t);
}

struct Variant {
  const char* name;
  IntgFn intg;
  LowraFn lowra;
};
static const Variant kVariants[] = {
    {"old", lowbit::intg_dequant_old, lowbit::lowra_dequant_old},
    {"new", lowbit::intg_dequant_new, lowbit::lowra_dequant_new},
};

__global__ void fill16(uint4* p, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = make_uint4(i, i, i, i);
}

static std::mt19937_64 rng(1234);
// Random bytes: slices of one 8 MiB host pool at random offsets (copies differ, generation stays fast).
static void* dev_random(size_t bytes) {
  static std::vector<uint64_t> pool;
  if (pool.empty()) {
    pool.resize(1 << 20);
    for (auto& w : pool) w = rng();
  }
  const uint8_t* src = reinterpret_cast<const uint8_t*>(pool.data());
  const size_t pool_bytes = pool.size() * 8;
  void* d;
  CK(cudaMalloc(&d, bytes + 16));
  for (size_t done = 0; done < bytes;) {
    const size_t off = rng() % (pool_bytes / 2), n = std::min(bytes - done, pool_bytes - off);
    CK(cudaMemcpy(static_cast<uint8_t*>(d) + done, src + off, n, cudaMemcpyHostToDevice));
    done += n;
  }
  return d;
}
template <typename T>
static void* dev_copy(const std::vector<T>& h) {
  void* d;
  CK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
  CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
static uint16_t to_half_bits(float f) {  // finite, normal range only: enough for random test values
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  int e = static_cast<int>((x >> 23) & 0xFF) - 127 + 15;
  if (e <= 0) return static_cast<uint16_t>(sign);
  if (e >= 31) e = 30;
  return static_cast<uint16_t>(sign | (e << 10) | ((x >> 13) & 0x3FFu));
}

static bool same_bytes(const void* a, const void* b, size_t bytes) {
  std::vector<uint8_t> ha(bytes), hb(bytes);
  CK(cudaMemcpy(ha.data(), a, bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hb.data(), b, bytes, cudaMemcpyDeviceToHost));
  return memcmp(ha.data(), hb.data(), bytes) == 0;
}

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? atoll(argv[1]) : 14336, cols = argc > 2 ? atoll(argv[2]) : 4096;
  const int64_t group = 128, n_groups = (cols + group - 1) / group;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const size_t l2 = prop.l2CacheSize;
  const size_t out_bytes = rows * cols * 2;
  const int n_out = static_cast<int>(std::max<size_t>(2, 4 * l2 / out_bytes + 1));
  std::vector<void*> outs(n_out), refs(2);
  for (auto& o : outs) CK(cudaMalloc(&o, out_bytes));
  for (auto& o : refs) CK(cudaMalloc(&o, out_bytes * 2));  // room for fp32 outputs
  printf("%s, %d SMs, L2 %zu MB, [%lld, %lld] bf16 out, %d output copies\n", prop.name, prop.multiProcessorCount,
         l2 >> 20, (long long)rows, (long long)cols, n_out);

  // ceilings
  {
    const auto [t, gbps] = device_copy_ceiling();
    printf("copy 1 GiB: %.1f us, %.0f GB/s (read + write)\n", t, gbps);
    const double tf = time_us([&](int i) { fill16<<<prop.multiProcessorCount * 8, 256>>>(
                                               static_cast<uint4*>(outs[i]), out_bytes / 16); }, n_out);
    printf("fill output (write only): %.1f us, %.0f GB/s\n", tf, out_bytes / tf / 1e3);
  }

  // ---------------- intg
  for (int bits : {2, 3, 4}) {
    const int64_t row_bytes = (cols * bits + 7) / 8;
    const size_t in_bytes = rows * row_bytes + rows * n_groups * 3;
    const int n_in = static_cast<int>(std::max<size_t>(2, 4 * l2 / in_bytes + 1));
    std::vector<lowbit::IntgParams> ps(n_in);
    for (auto& p : ps) {
      std::vector<uint16_t> scale(rows * n_groups);
      std::vector<uint8_t> zero(rows * n_groups);
      for (auto& s : scale) s = to_half_bits(1e-3f + 0.01f * (rng() % 1000) / 1000.f);
      for (auto& z : zero) z = static_cast<uint8_t>(rng() % (1u << bits));
      p = lowbit::IntgParams{};
      p.qweight = static_cast<const uint8_t*>(dev_random(rows * row_bytes));
      p.row_bytes = row_bytes;
      p.scale = dev_copy(scale);
      p.scale_dtype = lowbit::kF16;
      p.zero = static_cast<const uint8_t*>(dev_copy(zero));
      p.n_groups = n_groups;
      p.group_size = group;
      p.rows = rows;
      p.cols = cols;
      p.bits = bits;
    }
    // bit-exactness against `old` in bf16, fp16, fp32 and offset mode
    lowbit::IntgParams po = ps[0];
    std::vector<uint16_t> off(rows * n_groups);
    for (auto& o : off) o = to_half_bits((static_cast<int>(rng() % 2000) - 1000) * 1e-4f);
    po.offset = dev_copy(off);
    po.offset_dtype = lowbit::kF16;
    po.zero = nullptr;
    for (const auto& v : kVariants) {
      bool ok = true;
      for (int dt : {lowbit::kBF16, lowbit::kF16, lowbit::kF32})
        for (const auto* p : {&ps[0], &po}) {
          CK(kVariants[0].intg(*p, refs[0], dt, 0));
          CK(v.intg(*p, refs[1], dt, 0));
          ok = ok && same_bytes(refs[0], refs[1], out_bytes * (dt == lowbit::kF32 ? 2 : 1));
        }
      const double t = time_us([&](int i) { CK(v.intg(ps[i % n_in], outs[i % n_out], lowbit::kBF16, 0)); },
                               n_in * n_out);
      printf("int%d %-4s %7.1f us %6.0f GB/s  bit-exact vs old: %s\n", bits, v.name, t, (in_bytes + out_bytes) / t / 1e3,
             ok ? "yes" : "NO");
    }
  }

  // ---------------- lowra: widths 1, 2, 4 in equal shares, random rows
  {
    std::vector<int> width(rows);
    for (auto& w : width) w = 1 << (rng() % 3);
    const size_t cpr = cols / 8;
    size_t in_bytes = 0;
    for (int i = 0; i < 3; ++i) {
      const int b = 1 << i;
      const int64_t n = std::count(width.begin(), width.end(), b);
      in_bytes += n * cpr * b + n * (2u << b) + n * 4;
    }
    const int n_in = static_cast<int>(std::max<size_t>(2, 4 * l2 / in_bytes + 1));
    std::vector<lowbit::LowraParams> ps(n_in);
    for (auto& p : ps) {
      p = lowbit::LowraParams{};
      p.rows = rows;
      p.cols = cols;
      for (int i = 0; i < 3; ++i) {
        const int b = 1 << i;
        std::vector<int32_t> map;
        for (int64_t r = 0; r < rows; ++r)
          if (width[r] == b) map.push_back(static_cast<int32_t>(r));
        std::vector<uint16_t> book(map.size() << b);
        for (auto& e : book) e = to_half_bits(std::normal_distribution<float>(0.f, 1.f)(rng));
        auto& c = p.cls[i];
        c.n = static_cast<int64_t>(map.size());
        c.codes = static_cast<const uint8_t*>(dev_random(c.n * cpr * b));
        c.codebook = static_cast<const uint16_t*>(dev_copy(book));
        c.rows_map = static_cast<const int32_t*>(dev_copy(map));
      }
    }
    for (const auto& v : kVariants) {
      bool ok = true;
      for (int dt : {lowbit::kBF16, lowbit::kF16, lowbit::kF32}) {
        CK(kVariants[0].lowra(ps[0], refs[0], dt, 0));
        CK(v.lowra(ps[0], refs[1], dt, 0));
        ok = ok && same_bytes(refs[0], refs[1], out_bytes * (dt == lowbit::kF32 ? 2 : 1));
      }
      const double t = time_us([&](int i) { CK(v.lowra(ps[i % n_in], outs[i % n_out], lowbit::kBF16, 0)); },
                               n_in * n_out);
      printf("lowra %-4s %7.1f us %6.0f GB/s  bit-exact vs old: %s\n", v.name, t, (in_bytes + out_bytes) / t / 1e3,
             ok ? "yes" : "NO");
    }
  }

  // ---------------- nf4 (double-quantized absmax, blocksize 64) for reference
  {
    const int64_t numel = rows * cols, nb = numel / 64, nnb = (nb + 255) / 256;
    const size_t in_bytes = numel / 2 + nb + nnb * 4;
    const int n_in = static_cast<int>(std::max<size_t>(2, 4 * l2 / in_bytes + 1));
    std::vector<float> qmap(16), nmap(256), nabs(nnb);
    for (auto& v : qmap) v = std::normal_distribution<float>(0.f, 1.f)(rng);
    for (auto& v : nmap) v = std::normal_distribution<float>(0.f, 1.f)(rng);
    for (auto& v : nabs) v = 0.01f + (rng() % 100) * 1e-4f;
    std::vector<lowbit::Nf4Params> ps(n_in);
    for (auto& p : ps) {
      p = lowbit::Nf4Params{};
      p.packed = static_cast<const uint8_t*>(dev_random(numel / 2));
      p.quant_map = static_cast<const float*>(dev_copy(qmap));
      p.blocksize = 64;
      p.absmax_code = static_cast<const uint8_t*>(dev_random(nb));
      p.nested_map = static_cast<const float*>(dev_copy(nmap));
      p.nested_absmax = static_cast<const float*>(dev_copy(nabs));
      p.nested_blocksize = 256;
      p.offset = 0.02f;
      p.rows = rows;
      p.cols = cols;
    }
    const double t = time_us([&](int i) { CK(lowbit::nf4_dequant_old(ps[i % n_in], outs[i % n_out], lowbit::kBF16, 0)); },
                             n_in * n_out);
    printf("nf4  old  %7.1f us %6.0f GB/s\n", t, (in_bytes + out_bytes) / t / 1e3);
  }
  return 0;
}

// The old nf4.cu object references the NF4 GEMV planner (nf4_gemv.cu), which these experiments never call.
namespace lowbit {
Nf4GemvPlan nf4_gemv_plan(const Nf4Params&, int64_t, int, const void*) { return Nf4GemvPlan{}; }
cudaError_t nf4_gemv_sk(const Nf4Params&, const Nf4GemvPlan&, const void*, int64_t, int, void*, float*, int*,
                        cudaStream_t) {
  return cudaErrorNotSupported;
}
}  // namespace lowbit
