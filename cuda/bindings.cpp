// Torch binding of the lowbitpack CUDA kernels (built by lowbitpack/kernels/cuda_ext.py with
// torch.utils.cpp_extension.load). Validates what the kernels assume, allocates outputs on the current
// stream's device, and maps torch dtypes to lowbit::DType. The kernels themselves are in the .cu files.
#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "lowbit_kernels.h"

namespace {

int dtype_code(const at::ScalarType t) {
  switch (t) {
    case at::kFloat: return lowbit::kF32;
    case at::kHalf: return lowbit::kF16;
    case at::kBFloat16: return lowbit::kBF16;
    default: TORCH_CHECK(false, "lowbitpack CUDA: unsupported float dtype ", t);
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lowbitpack CUDA: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "lowbitpack CUDA: ", name, " must be contiguous");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lowbitpack CUDA: ", what, " failed: ", cudaGetErrorString(err));
}

lowbit::IntgParams intg_params(const at::Tensor& qweight, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                               const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& g_idx,
                               int64_t rows, int64_t cols, int64_t bits, int64_t group_size) {
  check_cuda(qweight, "qweight");
  check_cuda(scale, "scale");
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "qweight must be uint8");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be 1..8");
  const int64_t row_bytes = (cols * bits + 7) / 8;
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) == rows && qweight.size(1) == row_bytes,
              "qweight must be [", rows, ", ", row_bytes, "]");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == rows, "scale must be [rows, n_groups]");
  TORCH_CHECK(zero.has_value() != offset.has_value(), "exactly one of zero / offset");
  lowbit::IntgParams p{};
  p.qweight = qweight.data_ptr<uint8_t>();
  p.row_bytes = row_bytes;
  p.scale = scale.data_ptr();
  p.scale_dtype = dtype_code(scale.scalar_type());
  p.n_groups = scale.size(1);
  if (zero) {
    check_cuda(*zero, "zero");
    TORCH_CHECK(zero->scalar_type() == at::kByte && zero->sizes() == scale.sizes(), "zero must be uint8 like scale");
    p.zero = zero->data_ptr<uint8_t>();
  } else {
    check_cuda(*offset, "offset");
    TORCH_CHECK(offset->sizes() == scale.sizes(), "offset must have scale's shape");
    p.offset = offset->data_ptr();
    p.offset_dtype = dtype_code(offset->scalar_type());
  }
  if (g_idx) {
    check_cuda(*g_idx, "g_idx");
    TORCH_CHECK(g_idx->scalar_type() == at::kInt && g_idx->numel() == cols, "g_idx must be int32 [cols]");
    p.g_idx = g_idx->data_ptr<int32_t>();
  } else {
    TORCH_CHECK(group_size >= 1 && (cols + group_size - 1) / group_size <= p.n_groups, "group_size does not match scale");
  }
  p.group_size = group_size;
  p.rows = rows;
  p.cols = cols;
  p.bits = static_cast<int>(bits);
  return p;
}

lowbit::Nf4Params nf4_params(const at::Tensor& packed, const at::Tensor& quant_map, const std::optional<at::Tensor>& absmax,
                             const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& nested_map,
                             const std::optional<at::Tensor>& nested_absmax, double offset,
                             int64_t blocksize, int64_t nested_blocksize, int64_t rows, int64_t cols) {
  check_cuda(packed, "packed");
  check_cuda(quant_map, "quant_map");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (rows * cols + 1) / 2,
              "packed must be uint8 with (numel + 1) // 2 bytes");
  TORCH_CHECK(quant_map.scalar_type() == at::kFloat && quant_map.numel() == 16, "quant_map must be fp32 [16]");
  TORCH_CHECK(blocksize > 0 && blocksize % 16 == 0, "blocksize must be a positive multiple of 16");
  const int64_t n_blocks = (rows * cols + blocksize - 1) / blocksize;
  lowbit::Nf4Params p{};
  p.packed = packed.data_ptr<uint8_t>();
  p.quant_map = quant_map.data_ptr<float>();
  p.blocksize = blocksize;
  if (absmax) {
    check_cuda(*absmax, "absmax");
    TORCH_CHECK(absmax->scalar_type() == at::kFloat && absmax->numel() >= n_blocks, "absmax must be fp32 [n_blocks]");
    p.absmax = absmax->data_ptr<float>();
  } else {
    TORCH_CHECK(absmax_code && nested_map && nested_absmax, "nested absmax needs code, map and nested absmax");
    check_cuda(*absmax_code, "absmax_code");
    check_cuda(*nested_map, "nested_map");
    check_cuda(*nested_absmax, "nested_absmax");
    TORCH_CHECK(absmax_code->scalar_type() == at::kByte && absmax_code->numel() >= n_blocks, "absmax code must be uint8");
    TORCH_CHECK(nested_map->scalar_type() == at::kFloat && nested_map->numel() == 256, "nested map must be fp32 [256]");
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat, "nested absmax must be fp32");
    TORCH_CHECK(nested_blocksize > 0 &&
                    nested_absmax->numel() >= (n_blocks + nested_blocksize - 1) / nested_blocksize,
                "nested absmax too short");
    p.absmax_code = absmax_code->data_ptr<uint8_t>();
    p.nested_map = nested_map->data_ptr<float>();
    p.nested_absmax = nested_absmax->data_ptr<float>();
    p.nested_blocksize = nested_blocksize;
    p.offset = static_cast<float>(offset);  // an fp32 value carried in a double: exact
  }
  p.rows = rows;
  p.cols = cols;
  return p;
}

// LowRA: per width class (1, 2, 4) codes uint8 [n, row_bytes], codebook fp16 [n, 2^b], rows_map int32 [n].
lowbit::LowraParams lowra_params(const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& codebooks,
                                 const std::vector<at::Tensor>& rows_maps, int64_t rows, int64_t cols) {
  TORCH_CHECK(codes.size() == 3 && codebooks.size() == 3 && rows_maps.size() == 3, "three width classes (1, 2, 4)");
  const int widths[3] = {1, 2, 4};
  lowbit::LowraParams p{};
  int64_t total = 0;
  for (int k = 0; k < 3; ++k) {
    const int b = widths[k];
    const at::Tensor &c = codes[k], &cb = codebooks[k], &rm = rows_maps[k];
    check_cuda(c, "codes");
    check_cuda(cb, "codebook");
    check_cuda(rm, "rows_map");
    const int64_t n = c.size(0);
    TORCH_CHECK(c.scalar_type() == at::kByte && c.dim() == 2 && c.size(1) == (cols * b + 7) / 8,
                "codes", b, " must be uint8 [n, ", (cols * b + 7) / 8, "]");
    TORCH_CHECK(cb.scalar_type() == at::kHalf && cb.dim() == 2 && cb.size(0) == n && cb.size(1) == (1 << b),
                "codebook", b, " must be fp16 [n, ", 1 << b, "]");
    TORCH_CHECK(rm.scalar_type() == at::kInt && rm.numel() == n, "rows_map must be int32 [n]");
    p.cls[k].codes = c.data_ptr<uint8_t>();
    p.cls[k].codebook = reinterpret_cast<const uint16_t*>(cb.data_ptr<at::Half>());
    p.cls[k].rows_map = rm.data_ptr<int32_t>();
    p.cls[k].n = n;
    total += n;
  }
  TORCH_CHECK(total == rows, "the width classes hold ", total, " rows, the weight has ", rows);
  p.rows = rows;
  p.cols = cols;
  return p;
}

at::Tensor gemv_out(const at::Tensor& x, int64_t rows) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8, "x must be [m <= 8, in]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  return at::empty({x.size(0), rows}, x.options());
}

at::Tensor intg_dequant(const at::Tensor& qweight, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                        const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& g_idx, int64_t rows,
                        int64_t cols, int64_t bits, int64_t group_size, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto p = intg_params(qweight, scale, zero, offset, g_idx, rows, cols, bits, group_size);
  at::Tensor out = at::empty({rows, cols}, qweight.options().dtype(out_dtype));
  check_launch(lowbit::intg_dequant(p, out.data_ptr(), dtype_code(out_dtype), c10::cuda::getCurrentCUDAStream().stream()),
               "intg_dequant");
  return out;
}

at::Tensor intg_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& offset,
                     const std::optional<at::Tensor>& g_idx, int64_t rows, int64_t cols, int64_t bits,
                     int64_t group_size) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto p = intg_params(qweight, scale, zero, offset, g_idx, rows, cols, bits, group_size);
  TORCH_CHECK(x.size(-1) == cols, "x has ", x.size(-1), " columns, weight has ", cols);
  at::Tensor y = gemv_out(x, rows);
  check_launch(lowbit::intg_gemv(p, x.data_ptr(), x.size(0), dtype_code(x.scalar_type()), y.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "intg_gemv");
  return y;
}

at::Tensor nf4_dequant(const at::Tensor& packed, const at::Tensor& quant_map, const std::optional<at::Tensor>& absmax,
                       const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& nested_map,
                       const std::optional<at::Tensor>& nested_absmax, double offset, int64_t blocksize,
                       int64_t nested_blocksize, int64_t rows, int64_t cols, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(packed.device());
  auto p = nf4_params(packed, quant_map, absmax, absmax_code, nested_map, nested_absmax, offset, blocksize,
                      nested_blocksize, rows, cols);
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(out_dtype));
  check_launch(lowbit::nf4_dequant(p, out.data_ptr(), dtype_code(out_dtype), c10::cuda::getCurrentCUDAStream().stream()),
               "nf4_dequant");
  return out;
}

// Which NF4 GEMV kernel the last nf4_gemv call ran ("stream-k", "pair-tile", "pair-ring" or "generic"): the factored
// kernels (nf4_gemv.cu) and the generic core round differently
// (lowbit_kernels.h), so the tests check each against its own exact product.
std::string g_last_nf4_gemv;

// Per-tile counters of the stream-K GEMV, one zeroed buffer per (device, stream): every call leaves them at
// zero, and calls on one stream never overlap. Inside a CUDA-graph capture the first call on the capture
// stream allocates from the graph's pool and records the zeroing in the graph; later calls reuse it.
int* tile_counters(const at::Tensor& like, int64_t n, cudaStream_t stream) {
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> cache;
  at::Tensor& buf = cache[{like.get_device(), stream}];
  if (!buf.defined() || buf.numel() < n) buf = at::zeros({std::max<int64_t>(n, 4096)}, like.options().dtype(at::kInt));
  return buf.data_ptr<int>();
}

at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& quant_map,
                    const std::optional<at::Tensor>& absmax, const std::optional<at::Tensor>& absmax_code,
                    const std::optional<at::Tensor>& nested_map, const std::optional<at::Tensor>& nested_absmax,
                    double offset, int64_t blocksize, int64_t nested_blocksize, int64_t rows, int64_t cols) {
  const c10::cuda::CUDAGuard guard(packed.device());
  auto p = nf4_params(packed, quant_map, absmax, absmax_code, nested_map, nested_absmax, offset, blocksize,
                      nested_blocksize, rows, cols);
  TORCH_CHECK(x.size(-1) == cols, "x has ", x.size(-1), " columns, weight has ", cols);
  at::Tensor y = gemv_out(x, rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int xd = dtype_code(x.scalar_type());
  const lowbit::Nf4GemvPlan plan = lowbit::nf4_gemv_plan(p, x.size(0), xd, x.data_ptr());
  if (plan.ok) {
    // Stream-K's fix-up scratch; the tile and ring forms share no tile and need none.
    int* counters = plan.partial_floats ? tile_counters(packed, plan.n_tiles, stream) : nullptr;
    at::Tensor partials;
    if (plan.partial_floats) partials = at::empty({plan.partial_floats}, packed.options().dtype(at::kFloat));
    check_launch(lowbit::nf4_gemv_sk(p, plan, x.data_ptr(), x.size(0), xd, y.data_ptr(),
                                     plan.partial_floats ? partials.data_ptr<float>() : nullptr, counters, stream),
                 "nf4_gemv (pair table)");
    g_last_nf4_gemv = plan.form == lowbit::kNf4Tile ? "pair-tile" : plan.form == lowbit::kNf4Ring ? "pair-ring" : "stream-k";
    return y;
  }
  check_launch(lowbit::nf4_gemv(p, x.data_ptr(), x.size(0), xd, y.data_ptr(), stream), "nf4_gemv");
  g_last_nf4_gemv = "generic";
  return y;
}

std::string last_nf4_gemv() { return g_last_nf4_gemv; }

at::Tensor lowra_dequant(const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& codebooks,
                         const std::vector<at::Tensor>& rows_maps, int64_t rows, int64_t cols, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(codes.at(0).device());
  auto p = lowra_params(codes, codebooks, rows_maps, rows, cols);
  at::Tensor out = at::empty({rows, cols}, codes[0].options().dtype(out_dtype));
  check_launch(lowbit::lowra_dequant(p, out.data_ptr(), dtype_code(out_dtype), c10::cuda::getCurrentCUDAStream().stream()),
               "lowra_dequant");
  return out;
}

at::Tensor lowra_gemv(const at::Tensor& x, const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& codebooks,
                      const std::vector<at::Tensor>& rows_maps, int64_t rows, int64_t cols) {
  const c10::cuda::CUDAGuard guard(codes.at(0).device());
  auto p = lowra_params(codes, codebooks, rows_maps, rows, cols);
  TORCH_CHECK(x.size(-1) == cols, "x has ", x.size(-1), " columns, weight has ", cols);
  at::Tensor y = gemv_out(x, rows);
  check_launch(lowbit::lowra_gemv(p, x.data_ptr(), x.size(0), dtype_code(x.scalar_type()), y.data_ptr(),
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "lowra_gemv");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbitpack CUDA kernels: dequantize and fused dequant-GEMV per layout";
  m.def("intg_dequant", &intg_dequant);
  m.def("intg_gemv", &intg_gemv);
  m.def("nf4_dequant", &nf4_dequant);
  m.def("nf4_gemv", &nf4_gemv);
  m.def("last_nf4_gemv", &last_nf4_gemv);
  m.def("lowra_dequant", &lowra_dequant);
  m.def("lowra_gemv", &lowra_gemv);
}
