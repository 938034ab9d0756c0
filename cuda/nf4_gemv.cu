// NF4 fused GEMV, pair-table kernels: y[m, rows] = x[m, cols] @ W^T for 1 <= m <= 8 and whole 128-column
// iterations (cols % 128 == 0, power-of-two blocksize >= 64), in three forms: persistent stream-K, one block
// per tile, and (sm_90) the ring form further down, the default there. Other shapes use the generic core
// (nf4.cu).
//
// Why a second NF4 GEMV: the generic core rebuilds every weight exactly as dequantize() does (table lookup,
// fp32 multiply by absmax, round), ~4 instructions a weight, and at 14336x4096 it is issue- and
// latency-bound at ~27 us against a ~10 us memory floor. This kernel does ~1.5:
//
// 1. Absmax is factored out of the dot product. Within a 64-column sub-block every weight of a row shares
//    one absmax, so y = sum_sub absmax * (sum_k r(quant_map[q_k]) * x_k), with r() rounding to x's dtype.
//    The inner sums run on the tensor cores (mma.m16n8k16, fp32 accumulate) over a fresh accumulator per
//    sub-block, then 4 FFMAs scale it. This is NOT bit-identical to dequantize()-then-matmul (there each
//    weight is r(quant_map[q] * absmax)); both round each weight once, to the same relative precision. The
//    tests check it against a float64 product with exactly these weights.
// 2. One lookup gives two weights: a byte (two codes) indexes a 256-entry table of packed pairs
//    {r(qm[hi]), r(qm[lo])}, which is directly an mma A register. The table is replicated per lane (entry e
//    of lane l at byte e*256 + 4*l, 64 KB) so that a warp's 32 lookups hit 32 different banks, and one
//    PRMT builds the address (byte 1 = the code byte, byte 0 = 4*lane). Per two weights: PRMT + LDS.
// 3. Stream-K over a persistent grid: the (16-row tile, step) space is split evenly over all warp groups
//    (a group of `group` warps works on one tile at a time, each warp on its own 128 columns of a step, so
//    together they read 64 * group contiguous bytes of each row). There is no partial last wave (896 tiles of
//    14336x4096 over 528 block slots was 1.7 waves). A group that covers a whole tile stores it; groups that
//    share a tile write fp32 partials, count themselves on a per-tile counter, and the last one sums the
//    partials in group order (deterministic) and stores the tile. Counters are left at zero for the next call.
//
// The same kernel also runs in a one-block-per-tile form (kTile): the grid is the tiles, a block's warps
// are one group, and a 32 KB per-lane table (entry e at e * 128 + 4 * lane: PRMT + shift) is filled by
// every block. It suits weights whose tiles fit in about one wave.
//
// What it bought (H100, docs/KERNELS.md iteration 4): the decode is ~1.5-2 instructions a weight instead of
// ~4, yet neither form is faster at one token on 14336x4096 -- they are bound by memory latency and their
// start-up and fix-up round trips, not by issue. Stream-K wins with several tokens (m = 8: 26.3 against
// 33.6 us at 14336x4096) and on very large weights; the tile form on weights of <= 2 tiles per SM
// (4096x14336: 21.1 against 24.3 us). nf4_gemv_plan runs each only there.
//
// Fragment mapping: lane = 4g + t owns rows g and g + 8 of the tile. For each 64-column sub-block it loads
// the 8 code bytes of columns [16t, 16t + 16) of both rows. mma j (0..3) takes bytes 2j (k slots 2t, 2t+1)
// and 2j + 1 (k slots 2t+8, 2t+9), i.e. columns 16t + 4j .. +3, so all 16 k slots of an mma lie in one
// sub-block; B is x's own consecutive pairs of the same columns.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include <cuda.h>          // CUtensorMap (the ring form's tensor map; encoded through the runtime's driver entry point)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include "common.cuh"

namespace lowbit {
namespace {

// Stream-K form: one block per SM (persistent). Its pair table must start at a 64 KB boundary of the shared
// window so that one PRMT builds the whole address (bytes 2-3 = the table's, byte 1 = code byte, byte 0 =
// 4 * lane); the dynamic shared memory starts at 0x400 on sm_90, so the block asks for 128 KB and places the
// table at the first 64 KB boundary, the nested map and the group reduction buffers after it. (The tile
// form uses a 32 KB table at the start of its shared memory: sk_variant_smem.)
// x is staged in shared memory when it is at most this large (m * cols * 2 bytes): its loads then wait
// ~30 cycles on the shared-memory pipe instead of an L1 round trip behind the streaming code loads.
constexpr int kSkXSmemMax = 32 * 1024;

// Raw global bits of one iteration for one lane: codes of rows g / g + 8, sub-blocks A / B, and the raw
// absmax bits of each row (nested: the uint8 code(s); plain: the fp32 absmax bits).
template <bool kNested, bool kBs64>
struct SkRaw {
  static constexpr int kS = (!kNested && kBs64) ? 2 : 1;
  uint2 c[2][2];
  uint32_t s[2][kS];
  float n[2];  // nested absmax of each row (kNested)
};

template <bool kNested, bool kBs64>
struct SkArgs {
  const uint8_t* packed;
  const float* absmax;
  const uint8_t* absmax_code;
  const float* nested_absmax;
  float offset;
  int bs_shift;    // log2(blocksize)
  int nbs_shift;   // log2(nested_blocksize)
  int64_t rows, cols;
  int group;       // warps that share one tile at a time (divides n_it and the block's warps)
  int n_steps;     // n_it / group: steps of a tile (a step = one 128-column iteration per warp of the group)
  int total;       // n_tiles * n_steps (< 2^31, checked by the plan)
  int x_smem;      // x is staged in shared memory (after the reduction buffers)
  float* partials; // [groups_total][2][128]
  int* counters;   // [n_tiles], zero on entry and on exit
};

__device__ __forceinline__ uint2 ldg_stream8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// First step of worker w when `total` steps are split over `nw` workers (warp groups).
__device__ __forceinline__ int sk_start(int w, int total, int nw) {
  return static_cast<int>(static_cast<int64_t>(w) * total / nw);
}
// The worker whose range holds step f.
__device__ __forceinline__ int sk_owner(int f, int total, int nw) {
  return static_cast<int>(((static_cast<int64_t>(f) + 1) * nw - 1) / total);
}

// kMode (tuning experiments only, LOWBITPACK_NF4_SK_MODE): 0 = the kernel; 1 = no global code loads
// (decode and mma only: the compute-bound time); 2 = no decode (loads only: the load-bound time).
// kXShared: x is in shared memory at the 32-bit address xs_addr (x_smem known at compile time: LDS instead
// of generic loads).
template <typename XT, bool kNested, bool kBs64, int kMode = 0, bool kTable32 = false, bool kXShared = false>
struct SkWarp {
  const SkArgs<kNested, kBs64>& a;
  const XT* __restrict__ x;
  XT* __restrict__ y;
  int m;
  int lane, g, t;
  int wig;          // warp index in its group: this warp does iteration step * group + wig of each step
  uint32_t lut;     // shared address of this lane's column of the pair table: table + 4 * lane
  uint32_t nmap;    // shared address of the nested map
  const XT* xl;     // x row g, this lane's first column (16 * t), in global or (x_smem) shared memory
  int gw, nw;       // this warp's group (the stream-K worker) and the number of groups
  int begin, end;   // the group's range of steps

  // Fetch cursor: the next step to load and its rows' code pointers (this lane's bytes).
  int f_tile, f_step;
  const uint8_t* p0;
  const uint8_t* p1;
  uint32_t xs_addr;  // kXShared: shared address of xl

  __device__ __forceinline__ void set_fetch_tile(int tile, int step) {
    f_tile = tile;
    f_step = step;
    const int64_t r0 = min(static_cast<int64_t>(tile) * 16 + g, a.rows - 1);
    const int64_t r1 = min(static_cast<int64_t>(tile) * 16 + g + 8, a.rows - 1);
    const int it = step * a.group + wig;
    p0 = a.packed + r0 * (a.cols >> 1) + 64 * it + 8 * t;
    p1 = a.packed + r1 * (a.cols >> 1) + 64 * it + 8 * t;
  }

  __device__ __forceinline__ void fetch_row(const uint8_t* p, int slot, SkRaw<kNested, kBs64>& r) const {
    if constexpr (kMode == 1) {
      const uint32_t o = static_cast<uint32_t>(p - a.packed);
      r.c[slot][0] = make_uint2(o * 2654435761u, o ^ 0x5bd1e995u);
      r.c[slot][1] = make_uint2(o * 40503u, o + 0x9e3779b9u);
      r.s[slot][0] = o & 0xFFFFu;
      r.n[slot] = 1.0f;
      return;
    }
    r.c[slot][0] = ldg_stream8(p);
    r.c[slot][1] = ldg_stream8(p + 32);
    // absmax block of sub-block A: element (2 * byte offset) >> log2(blocksize); the lane's 8 * t bytes
    // never cross a block (blocksize >= 64). Even when blocksize is 64 (cols % 128 == 0).
    fetch_absmax(static_cast<uint32_t>((p - a.packed) >> (a.bs_shift - 1)), slot, r);
  }

  // The raw absmax bits of block `blk` (sub-block A; with blocksize 64 also blk + 1, sub-block B).
  __device__ __forceinline__ void fetch_absmax(uint32_t blk, int slot, SkRaw<kNested, kBs64>& r) const {
    if constexpr (kNested) {
      if constexpr (kBs64) r.s[slot][0] = __ldg(reinterpret_cast<const uint16_t*>(a.absmax_code + blk));
      else r.s[slot][0] = __ldg(a.absmax_code + blk);
      r.n[slot] = __ldg(a.nested_absmax + (blk >> a.nbs_shift));
    } else {
      if constexpr (kBs64) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(a.absmax + blk));
        r.s[slot][0] = v.x;
        r.s[slot][1] = v.y;
      } else {
        r.s[slot][0] = __float_as_uint(__ldg(a.absmax + blk));
      }
    }
  }

  // Load the next step into r and advance the fetch cursor.
  __device__ __forceinline__ void fetch(SkRaw<kNested, kBs64>& r) {
    fetch_row(p0, 0, r);
    fetch_row(p1, 1, r);
    p0 += 64 * a.group;
    p1 += 64 * a.group;
    if (++f_step == a.n_steps) set_fetch_tile(f_tile + 1, 0);
  }

  __device__ __forceinline__ float absmax_of(const SkRaw<kNested, kBs64>& r, int slot, int sub) const {
    if constexpr (kNested) {
      const uint32_t code = kBs64 ? ((r.s[slot][0] >> (8 * sub)) & 0xFFu) : r.s[slot][0];
      return double_quant_absmax(lds_f32(nmap + 4 * code), r.n[slot], a.offset);
    } else {
      return __uint_as_float(r.s[slot][kBs64 ? sub : 0]);
    }
  }

  // The pair {r(qm[hi nibble]), r(qm[lo nibble])} for byte b of w.
  __device__ __forceinline__ uint32_t pair(uint32_t w, int b) const {
    uint32_t v, addr;
    if constexpr (kTable32) {  // entry e at e * 128: isolate the byte (PRMT), then one shift-add
      addr = lut + (prmt(w, 0u, 0x4440u | static_cast<uint32_t>(b)) << 7);
    } else {  // 64 KB-aligned table, entry e at e * 256: byte 1 of the address <- code byte b, the rest from lut
      addr = prmt(w, lut, 0x7604u | (static_cast<uint32_t>(b) << 4));
    }
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
  }

  // acc += iteration `it` (columns 128 it ..) of rows g, g + 8.
  __device__ __forceinline__ void compute(const SkRaw<kNested, kBs64>& r, int it, float (&acc)[4]) const {
    if constexpr (kMode == 2) {
      acc[0] += __uint_as_float((r.c[0][0].x ^ r.c[0][1].y ^ r.c[1][0].x ^ r.c[1][1].y ^ r.s[0][0]) & 0x3FFFFFu);
      acc[1] += __uint_as_float((r.c[0][0].y ^ r.c[0][1].x ^ r.c[1][0].y ^ r.c[1][1].x ^ r.s[1][0]) & 0x3FFFFFu);
      return;
    }
    compute_with(r, it, [&](int slot, int sub) { return absmax_of(r, slot, sub); }, acc);
  }
  // The same with the absmax of (row slot, sub-block sub) from `absmax(slot, sub)` (r's codes only).
  template <typename Absmax>
  __device__ __forceinline__ void compute_with(const SkRaw<kNested, kBs64>& r, int it, const Absmax& absmax,
                                               float (&acc)[4]) const {
    if constexpr (kMode == 2) {  // no decode (tuning): keep the codes and absmax alive
      acc[0] += __uint_as_float((r.c[0][0].x ^ r.c[0][1].y ^ r.c[1][0].x ^ r.c[1][1].y) & 0x3FFFFFu) + absmax(0, 0);
      acc[1] += __uint_as_float((r.c[0][0].y ^ r.c[0][1].x ^ r.c[1][0].y ^ r.c[1][1].x) & 0x3FFFFFu) + absmax(1, 1);
      return;
    }
    // x of both sub-blocks first, then the two sub-blocks' mma chains interleaved (A0 B0 A1 B1 ...): each
    // chain accumulates into its own fragment, so consecutive mmas are independent. The sums are the same
    // as one sub-block after the other.
    const bool active = g < m;
    uint32_t xw[2][8];
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      if (active) {
        uint4 v0, v1;
        if constexpr (kXShared) {
          const uint32_t xa = xs_addr + 2u * static_cast<uint32_t>(it * 128 + 64 * sub);
          asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v0.x), "=r"(v0.y), "=r"(v0.z), "=r"(v0.w) : "r"(xa));
          asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                       : "=r"(v1.x), "=r"(v1.y), "=r"(v1.z), "=r"(v1.w)
                       : "r"(xa + 16));
        } else {
          const uint4* xp = reinterpret_cast<const uint4*>(xl + it * 128 + 64 * sub);
          v0 = xp[0];  // read-only during the kernel (global) or after the barrier (shared)
          v1 = xp[1];
        }
        xw[sub][0] = v0.x; xw[sub][1] = v0.y; xw[sub][2] = v0.z; xw[sub][3] = v0.w;
        xw[sub][4] = v1.x; xw[sub][5] = v1.y; xw[sub][6] = v1.z; xw[sub][7] = v1.w;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xw[sub][i] = 0u;
      }
    }
    float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int sub = 0; sub < 2; ++sub) {
        const uint32_t w0 = (j < 2) ? r.c[0][sub].x : r.c[0][sub].y;
        const uint32_t w1 = (j < 2) ? r.c[1][sub].x : r.c[1][sub].y;
        const int b = 2 * (j & 1);
        mma16816<XT>(d[sub], pair(w0, b), pair(w1, b), pair(w0, b + 1), pair(w1, b + 1), xw[sub][2 * j],
                     xw[sub][2 * j + 1]);
      }
    }
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      const float am0 = absmax(0, sub), am1 = absmax(1, sub);
      acc[0] = fmaf(am0, d[sub][0], acc[0]);
      acc[1] = fmaf(am0, d[sub][1], acc[1]);
      acc[2] = fmaf(am1, d[sub][2], acc[2]);
      acc[3] = fmaf(am1, d[sub][3], acc[3]);
    }
  }

  __device__ __forceinline__ void store_tile(int tile, const float (&v)[4]) const {
    const int64_t r0 = static_cast<int64_t>(tile) * 16 + g, r1 = r0 + 8;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int n = 2 * t + i;
      if (n < m) {
        if (r0 < a.rows) y[n * a.rows + r0] = Cvt<XT>::from(v[i]);
        if (r1 < a.rows) y[n * a.rows + r1] = Cvt<XT>::from(v[2 + i]);
      }
    }
  }

  __device__ __forceinline__ bool whole(int tile) const {
    return tile * a.n_steps >= begin && (tile + 1) * a.n_steps <= end;
  }

  // Partial slot of group w in `tile`: 0 for the tile its range starts in, 1 for the one it ends in.
  __device__ __forceinline__ int64_t slot_index(int w, int tile) const {
    const int first_tile = sk_start(w, a.total, nw) / a.n_steps;
    return (static_cast<int64_t>(w) * 2 + (tile == first_tile ? 0 : 1)) * 128;
  }

  // Publish this group's partial sums of a shared tile; the last group to arrive sums the partials in
  // group order (the same sum whichever arrives last) and stores the tile. Run by the group's first warp,
  // once its loads are done (a fence waits for the thread's outstanding memory operations).
  __device__ __forceinline__ void flush_partial(int tile, const float (&v)[4]) const {
    const int t0 = tile * a.n_steps, t1 = t0 + a.n_steps;
    float4* mine = reinterpret_cast<float4*>(a.partials + slot_index(gw, tile)) + lane;
    __stcg(mine, make_float4(v[0], v[1], v[2], v[3]));
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
    __syncwarp();
    const int first = sk_owner(t0, a.total, nw), last = sk_owner(t1 - 1, a.total, nw);
    int done = 0;
    if (lane == 0) done = atomicAdd(a.counters + tile, 1) == last - first;
    if (!__shfl_sync(0xffffffffu, done, 0)) return;
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    for (int w = first; w <= last; ++w) {
      const float4 p = __ldcg(reinterpret_cast<const float4*>(a.partials + slot_index(w, tile)) + lane);
      s[0] += p.x; s[1] += p.y; s[2] += p.z; s[3] += p.w;
    }
    store_tile(tile, s);
    if (lane == 0) a.counters[tile] = 0;
  }
};

// Fill the pair table (entry e of lane l at e * kEntryBytes + 4l: {r(qm[e >> 4]), r(qm[e & 15])}), the nested
// map after it, and x's first n16 16-byte pieces into xs, with threads [0, kThreads) of the block (tid). Every
// global load is issued before any of them is used, so this costs one memory latency, not one per loop trip.
template <typename XT, bool kNested, int kEntryBytes, int kThreads>
__device__ __forceinline__ void sk_fill_shared(int tid, uint8_t* table_ptr, const float* __restrict__ quant_map,
                                               const float* __restrict__ nested_map, const XT* __restrict__ x,
                                               XT* xs, int n16) {
  constexpr int kLutBytes = 256 * kEntryBytes;
  const float q = __ldg(quant_map + (tid & 15));
  constexpr int kNmPer = (256 + kThreads - 1) / kThreads;  // nested-map entries per thread
  float nmv[kNmPer];
#pragma unroll
  for (int k = 0; k < kNmPer; ++k) {
    const int i = tid + k * kThreads;
    nmv[k] = (kNested && i < 256) ? __ldg(nested_map + i) : 0.f;
  }
  constexpr int kXPer = (kSkXSmemMax / 16 + kThreads - 1) / kThreads;  // uint4 pieces of x per thread
  uint4 xv[kXPer];
#pragma unroll
  for (int k = 0; k < kXPer; ++k) {
    const int i = tid + k * kThreads;
    if (i < n16) xv[k] = __ldg(reinterpret_cast<const uint4*>(x) + i);
  }
  // 8 x 16 bytes = lanes 4j .. 4j + 3 of entry e. The trip count is the same for every lane (2048 / kThreads),
  // as the shuffles need.
  for (int i = tid; i < 256 * 8; i += kThreads) {
    const int e = i >> 3, j = i & 7;
    const uint32_t v = Cvt<XT>::pack2(__shfl_sync(0xffffffffu, q, e >> 4), __shfl_sync(0xffffffffu, q, e & 15));
    *reinterpret_cast<uint4*>(table_ptr + e * kEntryBytes + j * 16) = make_uint4(v, v, v, v);
  }
#pragma unroll
  for (int k = 0; k < kNmPer; ++k) {
    const int i = tid + k * kThreads;
    if (kNested && i < 256) reinterpret_cast<float*>(table_ptr + kLutBytes)[i] = nmv[k];
  }
#pragma unroll
  for (int k = 0; k < kXPer; ++k) {
    const int i = tid + k * kThreads;
    if (i < n16) reinterpret_cast<uint4*>(xs)[i] = xv[k];
  }
}

// kTile: one block per 16-row tile (grid = tiles, the block's warps are one group, no partial tiles), with
// a 32 KB per-lane table (entry e of lane l at e * 128 + 4l) that each block fills; several blocks share an
// SM. Otherwise persistent stream-K with the 64 KB table (see the top of the file).
template <typename XT, bool kNested, bool kBs64, int kWarps, int kPF, int kMode = 0, bool kTile = false>
__global__ void __launch_bounds__(kWarps * 32, kTile ? 512 / (kWarps * 32) : 1)
    nf4_gemv_sk_kernel(const SkArgs<kNested, kBs64> a, const float* __restrict__ quant_map,
                       const float* __restrict__ nested_map, const XT* __restrict__ x, int m, XT* __restrict__ y) {
  constexpr int kEntryBytes = kTile ? 128 : 256, kLutBytes = 256 * kEntryBytes;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int group = warp / a.group, wig = warp % a.group;
  const int nw = static_cast<int>(gridDim.x) * (kWarps / a.group);
  const int gw = static_cast<int>(blockIdx.x) * (kWarps / a.group) + group;
  const uint32_t base = smem_addr(smem);
  const uint32_t table = kTile ? base : (base + 0xFFFFu) & ~0xFFFFu;
  uint8_t* const table_ptr = smem + (table - base);
  float4* const red = reinterpret_cast<float4*>(table_ptr + kLutBytes + 256 * 4);  // [2][kWarps][32]
  XT* const xs = reinterpret_cast<XT*>(red + 2 * kWarps * 32);                      // [m][cols] (x_smem)
  SkWarp<XT, kNested, kBs64, kMode, kTile> W{a, x, y, m, lane, g, t, wig, table + 4u * static_cast<uint32_t>(lane),
                               table + kLutBytes, (a.x_smem ? xs : x) + static_cast<int64_t>(g < m ? g : 0) * a.cols + 16 * t,
                               gw, nw, sk_start(gw, a.total, nw), sk_start(gw + 1, a.total, nw)};
  // Ring of kPF + 1 buffers: step begin + i sits in buf[i % (kPF + 1)].
  SkRaw<kNested, kBs64> buf[kPF + 1];
  W.set_fetch_tile(W.begin / a.n_steps, W.begin % a.n_steps);
#pragma unroll
  for (int i = 0; i < kPF; ++i)
    if (W.begin + i < W.end) W.fetch(buf[i]);

  // Tables (and x), while the first codes are in flight.
  sk_fill_shared<XT, kNested, kEntryBytes, kWarps * 32>(threadIdx.x, table_ptr, quant_map, nested_map, x, xs,
                                                        a.x_smem ? static_cast<int>(m * a.cols / 8) : 0);
  __syncthreads();

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  // A range starting inside a tile shares that tile with the group before it: its sums wait in `first`
  // until the loop is done, so that the fences (which wait for the warp's loads) run after the last load.
  float first[4] = {0.f, 0.f, 0.f, 0.f};
  const int first_tile = W.begin / a.n_steps;
  int tile = first_tile, step = W.begin % a.n_steps, parity = 0;
  for (int f = W.begin; f < W.end; f += kPF + 1) {
#pragma unroll
    for (int u = 0; u <= kPF; ++u) {
      if (f + u < W.end) {
        if (f + u + kPF < W.end) W.fetch(buf[(u + kPF) % (kPF + 1)]);
        W.compute(buf[u], step * a.group + wig, acc);
        if (++step == a.n_steps || f + u + 1 == W.end) {
          if (a.group > 1) {  // the group's warps hold the same tile rows over different columns: sum them
            red[(parity * kWarps + warp) * 32 + lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
            if constexpr (kTile) __syncthreads();  // the group is the block (and a named barrier would
            else named_barrier(1 + group, a.group * 32);  // reserve all 16, which limits blocks per SM)
            if (wig == 0) {
              acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
              for (int w = 0; w < a.group; ++w) {
                const float4 v = red[(parity * kWarps + group * a.group + w) * 32 + lane];
                acc[0] += v.x; acc[1] += v.y; acc[2] += v.z; acc[3] += v.w;
              }
            }
            parity ^= 1;  // two buffers: a warp writes this one again only after the next barrier
          }
          if (wig == 0 && W.whole(tile)) {
            W.store_tile(tile, acc);
          } else if (wig == 0 && f + u + 1 < W.end) {  // the first tile, shared with the group before
#pragma unroll
            for (int i = 0; i < 4; ++i) first[i] = acc[i];
          }
          if (f + u + 1 < W.end || W.whole(tile) || wig != 0) acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
          step = 0;
          ++tile;
        }
      }
    }
  }
  if (wig != 0 || W.begin >= W.end) return;
  const int last_tile = (W.end - 1) / a.n_steps;
  if (first_tile != last_tile && !W.whole(first_tile)) W.flush_partial(first_tile, first);
  if (!W.whole(last_tile)) W.flush_partial(last_tile, acc);  // the range ends inside a shared tile
}

// ---- Ring form (sm_90): a producer warp streams the codes into shared memory with the tensor-copy engine.
//
// The other forms keep a tile's codes in flight in registers: 2 iterations a warp at ~124 registers, which
// left their loads-only skeleton 1.6x its read ceiling at 14336x4096 (docs/KERNELS.md, iteration 4). Here one
// producer warp per block copies stages of 16 rows x 64 * kWarps bytes (one bulk copy per row by default, or
// one tensor copy per stage) into a ring of kStages shared-memory stages, completing on mbarriers; data in
// flight needs no registers, so a block keeps kStages * ~9-17 KB of loads in flight. Each of the kWarps
// consumer warps takes one 128-column iteration of each stage (the pair-table decode and mma of
// SkWarp::compute; two per stage were no faster, iteration 5 runs 2-3), fetches its absmax bits kPF stages
// ahead, releases the stage, and the warps reduce a tile's sums when its last stage is done.
// The grid is persistent (one block per SM), each block taking a contiguous range of whole tiles (no shared
// tiles, no fix-up, deterministic).

// Bytes after each row's chunk in a stage: rows g and g + 1 then start 8 banks apart, so a warp's 8-byte
// code reads (8 rows x 32 bytes) take 2 shared-memory wavefronts, the minimum for 256 bytes. Per-row copies
// leave the pad alone; the tensor-copy variant fills it with the same copy (its box is 32 bytes wider than
// the chunk: the next chunk's first bytes, or zeros past the row's end), so its stage is one copy.
constexpr int kRingRowPad = 32;
// Stages whose absmax bits each consumer warp fetches ahead (registers; the codes come through the ring). 4 measured
// best with the branch-free loop (14336x4096, 1 token: 15.3 against 15.4-15.5 us for 3; 2 and 1: 15.6 and 16.1;
// 5: 16.4; docs/KERNELS.md, session 7).
constexpr int kRingPF = 4;

// mbarrier, bulk-copy and grid-dependency primitives. sm_90+ only: the plan never picks the ring form below
// that, and the kernel body compiles to a trap there, so they are only defined for sm_90+ device code.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LOWBIT_RING_ARCH 1
#endif
#ifdef LOWBIT_RING_ARCH
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// __syncwarp, then lane 0 arrives on `bar`: one asm with a predicated arrive, so the compiler emits no branch
// (and no reconvergence) around it.
__device__ __forceinline__ void warp_arrive_lane0(uint32_t bar, int lane) {
  asm volatile(
      "{\n\t.reg .pred p;\n\tbar.warp.sync -1;\n\tsetp.eq.u32 p, %1, 0;\n\t"
      "@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}" ::"r"(bar),
      "r"(lane)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Wait until the phase of parity `parity` of the barrier has completed (acquire: the stage's data is visible).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred done;\n"
      "RING_WAIT:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra RING_WAIT;\n}" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Bulk copy global -> shared; `bytes` (a multiple of 16, both addresses 16-byte aligned) complete on `bar`.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// Tensor copy global -> shared of the box at element coordinates {x0, y0} of the 2D tensor map; its bytes
// complete on `bar`.
__device__ __forceinline__ void tensor_copy_g2s(uint32_t dst, const CUtensorMap* map, int x0, int y0, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x0), "r"(y0), "r"(bar)
      : "memory");
}
__device__ __forceinline__ uint2 lds_u64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u8(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u8 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}
// Programmatic dependent launch (the ring form is launched with the programmatic-serialization attribute):
// launch_dependents lets the next kernel's blocks start on SMs this grid leaves; griddepcontrol.wait blocks
// until the kernels this one depends on have finished and their writes are visible (a no-op when the launch
// had no such dependency).
__device__ __forceinline__ void grid_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void grid_wait_prerequisites() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
#endif  // LOWBIT_RING_ARCH

// Tuning only (bench/gemv_exp.sh trace): per-block clocks of the ring kernel's last launch, read by
// ring_trace_dump(). [0] globaltimer at entry, [1] at the end of consumer warp 0's loop; clock64 at [2] entry,
// [3] after the grid wait, [4] tables ready, [5] loop end; [6] stages; [7] clocks consumer warp 0 waited on full
// stages; [60] clocks the producer waited on empty ones; [8 + s] (s < 20) consumer warp 0 past stage s's wait;
// [32 + s] the producer past stage s's empty wait.
#ifdef LOWBIT_RING_TRACE
constexpr int kTraceBlocks = 1024, kTraceSlots = 64;
__device__ unsigned long long g_ring_trace[kTraceBlocks][kTraceSlots];
__device__ __forceinline__ unsigned long long trace_gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define RING_TRACE(i, v) \
  do { if (blockIdx.x < kTraceBlocks) g_ring_trace[blockIdx.x][i] = (v); } while (0)
#else
#define RING_TRACE(i, v) do { } while (0)
#endif

// Shared memory of the ring form: the 32 KB pair table, the nested map, the two reduction buffers, the barriers
// (kStages full and empty, then the two absmax slots' full and empty; padded to 128 bytes: tensor copies need
// 128-byte aligned stages), the stages; after them the two tile-absmax slots (kTileAbsmax), then x (x_smem).
__host__ __device__ constexpr int ring_stage_bytes(int iterations) { return 16 * (64 * iterations + kRingRowPad); }
__host__ __device__ constexpr int ring_bars_bytes(int stages) { return (16 * stages + 32 + 127) / 128 * 128; }
__host__ __device__ constexpr int ring_head_bytes(int warps, int stages) {
  return 256 * 128 + 256 * 4 + 2 * warps * 32 * 16 + ring_bars_bytes(stages);
}
// With absmax warps, each stage's fp32 absmax, [iteration][g][row g sub-block A, B; row g + 8 A, B] (16 bytes an
// (iteration, g): one conflict-free LDS.128 a lane), written by the absmax warps.
__host__ __device__ constexpr int ring_amax_stage_bytes(int iterations) { return iterations * 8 * 16; }
__host__ __device__ constexpr int ring_smem(int warps, int stages, int amax_warps = 0) {
  return ring_head_bytes(warps, stages) + stages * (ring_stage_bytes(warps) + (amax_warps ? ring_amax_stage_bytes(warps) : 0));
}
// kTileAbsmax: a tile's absmax codes (16 rows x cols / blocksize bytes, contiguous) come in one bulk copy into
// one of two slots when the producer starts the tile, instead of each consumer warp fetching its own from global
// memory at every stage (8 tokens, 14336x4096: 21.2 -> 18.8 us). The plan uses them where they pay (nf4_gemv_plan).
inline int64_t ring_tile_absmax_bytes(int64_t cols, int64_t blocksize) { return 16 * (cols / blocksize); }

// kMode (tuning experiments only, LOWBITPACK_NF4_SK_MODE with ring16s6 or ring16s6r): 0 = the kernel; 1 = no decode (the
// pipeline alone: copies, waits, code reads); 2 = no copies and no waits (the consumers' decode and mma alone).
// kAmaxWarps: one or two helper warps after the producer compute each stage's fp32 absmax into shared memory (the
// stage's full barrier then waits for their arrivals too), so the consumers fetch and decode no absmax.
template <typename XT, bool kNested, bool kBs64, int kWarps, int kStages, int kPF, bool kXSmem, int kMode = 0,
          bool kRowCopies = false, int kPerSM = 1, bool kTileAbsmax = false, int kAmaxWarps = 0>
__global__ void __launch_bounds__((kWarps + 1 + kAmaxWarps) * 32, kPerSM)
    nf4_gemv_ring_kernel(const SkArgs<kNested, kBs64> a, const __grid_constant__ CUtensorMap codes_map,
                         const float* __restrict__ quant_map,
                         const float* __restrict__ nested_map, const XT* __restrict__ x, int m, XT* __restrict__ y) {
#ifndef LOWBIT_RING_ARCH
  __trap();
#else
  static_assert(!kTileAbsmax || kNested, "tile absmax slots hold the nested codes");
  constexpr int kRowBytes = 64 * kWarps, kRowStride = kRowBytes + kRingRowPad;
  constexpr int kStageBytes = ring_stage_bytes(kWarps);
  extern __shared__ __align__(16) uint8_t smem[];
  // The producer is the block's first warp (warp -kHelpers here), then the absmax warps (-kAmaxWarps .. -1), the
  // consumers warps 0 .. kWarps - 1: the warp schedulers favour older warps, and the producer's copy loop is latency-bound, so issuing it first keeps the stages coming
  // (14336x4096, 1 token: 15.02-15.13 against 15.25-15.36 us as the last warp; docs/KERNELS.md, session 8).
  constexpr bool kAmaxWarp = kAmaxWarps > 0;
  static_assert(!(kTileAbsmax && kAmaxWarp) && kAmaxWarps <= 2, "one absmax source");
  constexpr int kHelpers = 1 + kAmaxWarps;  // the producer, then the absmax warps
  const int lane = threadIdx.x & 31, warp = static_cast<int>(threadIdx.x >> 5) - kHelpers, g = lane >> 2, t = lane & 3;
  float4* const red = reinterpret_cast<float4*>(smem + 256 * 128 + 256 * 4);  // [2][kWarps][32]
  uint8_t* const bars = reinterpret_cast<uint8_t*>(red + 2 * kWarps * 32);   // full[kStages], empty[kStages], ...
  uint8_t* const ring = smem + ring_head_bytes(kWarps, kStages);
  const uint32_t row_blocks = static_cast<uint32_t>(a.cols >> a.bs_shift);
  const uint32_t amax_bytes = kTileAbsmax ? 16u * row_blocks : 0u;  // a multiple of 16 (cols % 128 == 0)
  constexpr int kAmaxStageBytes = kAmaxWarp ? ring_amax_stage_bytes(kWarps) : 0;
  uint8_t* const amax_stages = ring + kStages * kStageBytes;  // kAmaxWarp
  uint8_t* const amax_slots = amax_stages + kStages * kAmaxStageBytes;
  XT* const xs = reinterpret_cast<XT*>(amax_slots + 2 * amax_bytes);
  static_assert(kStageBytes % 128 == 0 && (kRowBytes + kRingRowPad) / 8 <= 256, "tensor-copy box limits");
  const uint32_t full0 = smem_addr(bars), empty0 = full0 + 8 * kStages, ring0 = smem_addr(ring);
  const uint32_t afull0 = empty0 + 8 * kStages, aempty0 = afull0 + 16, amax0 = smem_addr(amax_slots);
  const int n_tiles = static_cast<int>((a.rows + 15) >> 4);
  const int tile0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) * n_tiles / gridDim.x);
  const int tile1 = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * n_tiles / gridDim.x);
  const int n_stages = (tile1 - tile0) * a.n_steps;  // a.n_steps: stages (chunks of kWarps iterations) a tile
  const int64_t row_bytes = a.cols >> 1;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(full0 + 8 * i, 1 + kAmaxWarps);  // the producer's arrive (plus the copies' bytes), the absmax warps'
      mbar_init(empty0 + 8 * i, kWarps);      // one arrive per consumer warp
    }
    for (int i = 0; i < 2; ++i) {
      mbar_init(afull0 + 8 * i, 1);
      mbar_init(aempty0 + 8 * i, kWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // Programmatic dependent launch: the next kernel may take the SMs this grid leaves, and nothing in global
  // memory is touched before the kernels before this one are done (only the launch and the barrier set-up
  // overlap them).
#ifdef LOWBIT_RING_TRACE
  const unsigned long long tr_entry = clock64();
  if (threadIdx.x == 0) { RING_TRACE(0, trace_gtime()); RING_TRACE(2, tr_entry); }
  unsigned long long tr_wait = 0;
#endif
  grid_launch_dependents();
  grid_wait_prerequisites();
#ifdef LOWBIT_RING_TRACE
  if (threadIdx.x == 0) RING_TRACE(3, clock64());
#endif

  if constexpr (kAmaxWarp) {
    if (warp < 0 && warp >= -kAmaxWarps) {
      // Absmax warps: for each stage, once its slot is free, the fp32 absmax of every (row, iteration, sub-block).
      // One warp: lane L does row L / 2 and half L % 2 of the stage's iterations; two: each does 8 rows, lane L row
      // L / 4 and quarter L % 4. Then each arrives on the stage's full barrier (release: the consumers' wait sees
      // the stores). Loading the raw bits two stages ahead measured slower.
      constexpr int kRows = 16 / kAmaxWarps, kLanesPerRow = 32 / kRows, kIts = kWarps / kLanesPerRow;
      const int r = (warp + kAmaxWarps) * kRows + lane / kLanesPerRow, h = lane % kLanesPerRow;
      const uint32_t amax_base = smem_addr(amax_stages) + static_cast<uint32_t>(((r & 7) * 4 + 2 * (r >> 3)) * 4);
      const int n_it = static_cast<int>(a.cols >> 7);
      // The nested map is read from the consumers' shared-memory copy (filled before named barrier 1, which the
      // absmax warps join after issuing their first stage's loads). Through L1 from global memory, each of its
      // lines a block first touches mid-run cost an L2 round trip on the stage's path: with bitsandbytes-quantized
      // weights, whose codes fill the map's lines gradually, 15.1 against 14.5 us for random codes (14336x4096).
      const uint32_t nmap_s = smem_addr(smem) + 256 * 128;
      if (n_stages == 0) named_barrier(1, (kWarps + kAmaxWarps) * 32);
      int tile = tile0, chunk = 0, slot = 0, phase = 0;
      for (int s = 0; s < n_stages; ++s) {
        if (s >= kStages) mbar_wait(empty0 + 8 * slot, phase ^ 1);
        const uint32_t row_blk =
            static_cast<uint32_t>(imin64(static_cast<int64_t>(tile) * 16 + r, a.rows - 1)) * row_blocks;
        uint32_t w[kIts][2];  // nested: the code(s) in w[j][0]; plain: the fp32 bits of sub-blocks A, B
        float n[kIts];        // nested absmax
#pragma unroll
        for (int j = 0; j < kIts; ++j) {  // every load first
          const int it = min(chunk * kWarps + kIts * h + j, n_it - 1);
          const uint32_t blk = row_blk + (static_cast<uint32_t>(it * 128) >> a.bs_shift);
          if constexpr (kNested) {
            w[j][0] = kBs64 ? __ldg(reinterpret_cast<const uint16_t*>(a.absmax_code + blk)) : __ldg(a.absmax_code + blk);
            n[j] = __ldg(a.nested_absmax + (blk >> a.nbs_shift));
          } else if constexpr (kBs64) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(a.absmax + blk));
            w[j][0] = v.x;
            w[j][1] = v.y;
          } else {
            w[j][0] = w[j][1] = __float_as_uint(__ldg(a.absmax + blk));
          }
        }
        if (s == 0) named_barrier(1, (kWarps + kAmaxWarps) * 32);
#pragma unroll
        for (int j = 0; j < kIts; ++j) {
          float v[2];
#pragma unroll
          for (int sub = 0; sub < 2; ++sub) {
            if constexpr (kNested) {  // the same operations as the consumers' absmax_of
              const uint32_t code = kBs64 ? ((w[j][0] >> (8 * sub)) & 0xFFu) : w[j][0];
              v[sub] = double_quant_absmax(lds_f32(nmap_s + 4 * code), n[j], a.offset);
            } else {
              v[sub] = __uint_as_float(w[j][sub]);
            }
          }
          const uint32_t dst = amax_base + slot * kAmaxStageBytes + (kIts * h + j) * 128;
          asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(dst), "f"(v[0]), "f"(v[1]) : "memory");
        }
        warp_arrive_lane0(full0 + 8 * slot, lane);  // after the whole warp's stores (bar.warp.sync orders them)
        if (++slot == kStages) {
          slot = 0;
          phase ^= 1;
        }
        if (++chunk == a.n_steps) {
          chunk = 0;
          ++tile;
        }
      }
      return;
    }
  }
  if (warp < 0) {
    // Producer: a stage is the chunk's bytes of the tile's (up to) 16 rows.
    if (kMode == 2) return;
    if constexpr (!kRowCopies) {
      // Variant (ring<W>s<S>): lane 0 issues one 2D tensor copy a stage, the box 32 bytes wider than the chunk
      // (rows past the end come back as zeros and are never stored). One instruction a stage, yet ~14% slower
      // than per-row copies at 14336x4096 (docs/KERNELS.md, iteration 5).
      if (lane != 0) return;
      if ((ring0 & 127u) != 0u) __trap();  // the dynamic shared memory starts 1 KB-aligned on sm_90
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&codes_map)) : "memory");
    }
    const uint8_t* src = a.packed + static_cast<int64_t>(tile0) * 16 * row_bytes;  // the tile's first row
    int tile = tile0, chunk = 0, slot = 0, phase = 0;
    for (int s = 0; s < n_stages; ++s) {
      if constexpr (kTileAbsmax) {
        if (chunk == 0) {  // the tile's absmax codes, into slot lt & 1 once the tile two back has released it
          const int lt = tile - tile0;
          if (lt >= 2) mbar_wait(aempty0 + 8 * (lt & 1), ((lt >> 1) - 1) & 1);
          if (lane == 0) {
            mbar_arrive_expect_tx(afull0 + 8 * (lt & 1), amax_bytes);
            bulk_copy_g2s(amax0 + (lt & 1) * amax_bytes, a.absmax_code + static_cast<int64_t>(tile) * amax_bytes,
                          amax_bytes, afull0 + 8 * (lt & 1));
          }
        }
      }
#ifdef LOWBIT_RING_TRACE
      const unsigned long long tp0 = clock64();
#endif
      if (s >= kStages) mbar_wait(empty0 + 8 * slot, phase ^ 1);
#ifdef LOWBIT_RING_TRACE
      if (lane == 0) {
        const unsigned long long tp1 = clock64();
        tr_wait += tp1 - tp0;
        if (s < 20) RING_TRACE(32 + s, tp1);
        if (s + 1 == n_stages) RING_TRACE(60, tr_wait);
      }
#endif
      const uint32_t bar = full0 + 8 * slot, dst = ring0 + slot * kStageBytes;
      if constexpr (kRowCopies) {
        // The default (ring<W>s<S>r): one 1D bulk copy per row, lane r issuing row r's. The compiler serializes
        // the lanes, ~37 ns a copy (measured): fine at 16 copies per 16.9 KB stage, copy-bound at 8 KB stages of
        // 8 warps unless two blocks share the SM. Spreading the rows over 2 or 4 producer warps was slower
        // (18.9 against 17.1 us at 14336x4096): 18+ warps leave the consumers fewer registers.
        const int rows = static_cast<int>(imin64(16, a.rows - static_cast<int64_t>(tile) * 16));
        const int bytes = static_cast<int>(imin64(kRowBytes, row_bytes - static_cast<int64_t>(chunk) * kRowBytes));
        if (lane == 0) mbar_arrive_expect_tx(bar, rows * bytes);
        __syncwarp();
        if (lane < rows)
          bulk_copy_g2s(dst + lane * kRowStride,
                        src + static_cast<int64_t>(lane) * row_bytes + static_cast<int64_t>(chunk) * kRowBytes, bytes,
                        bar);
      } else {
        mbar_arrive_expect_tx(bar, kStageBytes);  // the whole box, zeros past the tensor's end included
        tensor_copy_g2s(dst, &codes_map, chunk * (kRowBytes / 8), tile * 16, bar);
      }
      if (++slot == kStages) {
        slot = 0;
        phase ^= 1;
      }
      if (++chunk == a.n_steps) {
        chunk = 0;
        ++tile;
        src += 16 * row_bytes;
      }
    }
    return;
  }

  SkWarp<XT, kNested, kBs64, kMode == 1 ? 2 : 0, true, kXSmem> W{
      a, x, y, m, lane, g, t, warp, smem_addr(smem) + 4u * static_cast<uint32_t>(lane), smem_addr(smem) + 256 * 128,
      (kXSmem ? xs : x) + static_cast<int64_t>(g < m ? g : 0) * a.cols + 16 * t, 0, 0, 0, 0};
  W.xs_addr = smem_addr(xs) + 2u * static_cast<uint32_t>((g < m ? g : 0) * a.cols + 16 * t);
  const int n_it = static_cast<int>(a.cols >> 7);
  // This warp's iteration in a stage: a stage's row chunk is kWarps iterations of 64 bytes.
  const auto iteration = [&](int chunk) { return chunk * kWarps + warp; };
  // Absmax fetch cursor (kPF stages ahead of the stage being computed) and its ring of raw bits. Block
  // indices are 32-bit (the plan checks that the weight has < 2^32 blocks): the first block of rows g and
  // g + 8 of the fetch tile, plus the iteration's. With kTileAbsmax only the nested absmax is fetched here;
  // the codes are read from the tile's slot when the stage is computed.
  SkRaw<kNested, kBs64> buf[kPF + 1];
  const auto row_block0 = [&](int tile, int r) {
    return static_cast<uint32_t>(imin64(static_cast<int64_t>(tile) * 16 + r, a.rows - 1)) * row_blocks;
  };
  int f_chunk = 0, f_tile = tile0;
  uint32_t f_blk0 = row_block0(tile0, g), f_blk1 = row_block0(tile0, g + 8);
  const auto fetch_absmax = [&](SkRaw<kNested, kBs64>& r) {
    // A partial stage's iterations past the row fetch the row's last block instead (unused): no branch.
    const int it = min(iteration(f_chunk), n_it - 1);
    const uint32_t b = static_cast<uint32_t>(it * 128) >> a.bs_shift;
    if constexpr (kTileAbsmax) {
      r.n[0] = __ldg(a.nested_absmax + ((f_blk0 + b) >> a.nbs_shift));
      r.n[1] = __ldg(a.nested_absmax + ((f_blk1 + b) >> a.nbs_shift));
    } else {
      W.fetch_absmax(f_blk0 + b, 0, r);
      W.fetch_absmax(f_blk1 + b, 1, r);
    }
    if (++f_chunk == a.n_steps) {
      f_chunk = 0;
      ++f_tile;
      f_blk0 = row_block0(f_tile, g);
      f_blk1 = row_block0(f_tile, g + 8);
    }
  };
  if constexpr (!kAmaxWarp) {
#pragma unroll
    for (int i = 0; i < kPF; ++i)
      if (i < n_stages) fetch_absmax(buf[i]);
  }
  sk_fill_shared<XT, kNested, 128, kWarps * 32>(warp * 32 + lane, smem, quant_map, nested_map, x, xs,
                                                kXSmem ? static_cast<int>(m * a.cols / 8) : 0);
  // The consumers' tables and x are ready (the producer is not waited for; the absmax warps wait for the nested map).
  named_barrier(1, (kWarps + kAmaxWarps) * 32);
#ifdef LOWBIT_RING_TRACE
  if (warp == 0 && lane == 0) { RING_TRACE(4, clock64()); RING_TRACE(6, static_cast<unsigned long long>(n_stages)); }
#endif

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int tile = tile0, chunk = 0, parity = 0, reducer = 0, slot = 0, phase = 0;
  const uint32_t amax_row = amax0 + g * row_blocks;  // kTileAbsmax: row g's codes in slot 0
  const uint32_t amax_stage0 = smem_addr(amax_stages);  // kAmaxWarp
  // One stage: fetch the absmax kPF stages ahead (`fetch`), wait for the stage, load this warp's codes, release
  // the stage, compute, and at a tile's last stage sum the warps' partial dot products.
  const auto stage = [&](SkRaw<kNested, kBs64>& cur, SkRaw<kNested, kBs64>& ahead, int s, bool fetch) {
    (void)s;  // the stage's index (trace builds)
    if constexpr (!kAmaxWarp) {
      if (fetch) fetch_absmax(ahead);
    }
    const int lt = tile - tile0;
    if constexpr (kTileAbsmax) {
      if (chunk == 0) mbar_wait(afull0 + 8 * (lt & 1), (lt >> 1) & 1);
    }
#ifdef LOWBIT_RING_TRACE
    const unsigned long long tc0 = clock64();
#endif
    if (kMode != 2) mbar_wait(full0 + 8 * slot, phase);
#ifdef LOWBIT_RING_TRACE
    if (warp == 0 && lane == 0) {
      const unsigned long long tc1 = clock64();
      tr_wait += tc1 - tc0;
      if (s < 20) RING_TRACE(8 + s, tc1);
    }
#endif
    const bool active = iteration(chunk) < n_it;  // the tile's last stage may be partial
    {  // an inactive iteration (a partial stage) loads bytes of its stage that it does not use: no branch
      const uint32_t p = ring0 + slot * kStageBytes + g * kRowStride + 64 * warp + 8 * t;
      cur.c[0][0] = lds_u64(p);
      cur.c[0][1] = lds_u64(p + 32);
      cur.c[1][0] = lds_u64(p + 8 * kRowStride);
      cur.c[1][1] = lds_u64(p + 8 * kRowStride + 32);
      if constexpr (kTileAbsmax) {
        const int it = min(iteration(chunk), n_it - 1);  // inside the row's codes (and the slot)
        const uint32_t q = amax_row + (lt & 1) * amax_bytes + (static_cast<uint32_t>(it * 128) >> a.bs_shift);
        cur.s[0][0] = kBs64 ? lds_u16(q) : lds_u8(q);
        cur.s[1][0] = kBs64 ? lds_u16(q + 8 * row_blocks) : lds_u8(q + 8 * row_blocks);
      }
    }
    float4 am = make_float4(0.f, 0.f, 0.f, 0.f);  // kAmaxWarp: rows g, g + 8 x sub-blocks A, B
    if constexpr (kAmaxWarp) {
      const uint32_t q = amax_stage0 + slot * kAmaxStageBytes + (warp * 8 + g) * 16;
      asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(am.x), "=f"(am.y), "=f"(am.z), "=f"(am.w) : "r"(q));
    }
    // The codes are in registers: lane 0 releases the stage once the warp's loads are issued (one predicated
    // arrive in the same asm as the warp barrier, so no branch).
    if (kMode != 2) warp_arrive_lane0(empty0 + 8 * slot, lane);
    if constexpr (kAmaxWarp) {
      if (active)
        W.compute_with(cur, iteration(chunk), [&](int row, int sub) { return row ? (sub ? am.w : am.z) : (sub ? am.y : am.x); },
                       acc);
    } else {
      if (active) W.compute(cur, iteration(chunk), acc);
    }
    if (++slot == kStages) {
      slot = 0;
      phase ^= 1;
    }
    if (++chunk == a.n_steps) {  // the tile's last stage: sum the warps' partial dot products
      if constexpr (kTileAbsmax) warp_arrive_lane0(aempty0 + 8 * (lt & 1), lane);  // its absmax codes are read
      red[(parity * kWarps + warp) * 32 + lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      named_barrier(2, kWarps * 32);
      if (warp == reducer) {  // in warp order (deterministic); the task rotates so no warp falls behind
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        for (int w = 0; w < kWarps; ++w) {
          const float4 v = red[(parity * kWarps + w) * 32 + lane];
          acc[0] += v.x; acc[1] += v.y; acc[2] += v.z; acc[3] += v.w;
        }
        W.store_tile(tile, acc);
      }
      reducer = reducer == kWarps - 1 ? 0 : reducer + 1;
      parity ^= 1;  // two buffers: a warp writes this one again only after the next barrier
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
      chunk = 0;
      ++tile;
    }
  };
  // Rounds of kPF + 1 stages (the absmax ring's length, so its slots are fixed registers). Every round but the
  // last one or two has all its stages and fetches ahead in each: that loop has no per-stage checks.
  for (int f = 0; f < n_stages; f += kPF + 1) {
    if (f + 2 * kPF < n_stages) {
#pragma unroll
      for (int u = 0; u <= kPF; ++u) stage(buf[u], buf[(u + kPF) % (kPF + 1)], f + u, true);
    } else {
#pragma unroll
      for (int u = 0; u <= kPF; ++u)
        if (f + u < n_stages) stage(buf[u], buf[(u + kPF) % (kPF + 1)], f + u, f + u + kPF < n_stages);
    }
  }
#ifdef LOWBIT_RING_TRACE
  if (warp == 0 && lane == 0) { RING_TRACE(5, clock64()); RING_TRACE(7, tr_wait); RING_TRACE(1, trace_gtime()); }
#endif
#endif
}

// Raise the kernel's dynamic shared-memory limit once per (kernel, device): the attribute call costs
// microseconds, which a 1-token GEMV should not pay every time.
cudaError_t allow_smem(const void* kern, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const std::lock_guard<std::mutex> lock(mu);
  if (done.count({kern, dev})) return cudaSuccess;
  e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done.insert({kern, dev});
  return e;
}

// Tuning variants: LOWBITPACK_NF4_SK=w<warps>g<group>pf<prefetch> (the instantiated ones below; `on` = the
// default), or off for the generic core; bench/kernels.py --nf4-variants compares them. The default was
// measured fastest on the H100 (docs/KERNELS.md).
struct SkVariant {
  int warps, group, pf;
  int form;        // Nf4GemvForm
  int stages = 0;             // ring form: shared-memory stages
  bool row_copies = false;    // ring form: one bulk copy per row instead of one tensor copy per stage
  int per_sm = 1;             // ring form: blocks per SM
  bool tile_absmax = false;   // ring form: a tile's absmax codes come through shared memory (nested only)
  int amax_warps = 0;         // ring form: absmax warps that compute each stage's fp32 absmax into shared memory
};
constexpr SkVariant kSkDefault{16, 4, 2, kNf4StreamK};

// The variant LOWBITPACK_NF4_SK names (`mode`); the default for anything else.
inline SkVariant parse_variant(const std::string& mode) {
  SkVariant v = kSkDefault;
  int w = 0, st = 0;
  if (std::sscanf(mode.c_str(), "tile%d", &w) == 1) return SkVariant{w, w, 2, kNf4Tile};
  int n = 0;
  if (std::sscanf(mode.c_str(), "ring%ds%d%n", &w, &st, &n) == 2) {  // ring<warps>s<stages>[r[2]][a]
    SkVariant r{w, w, kRingPF, kNf4Ring, st};
    const std::string opts = mode.substr(static_cast<size_t>(n));
    for (size_t i = 0; i < opts.size(); ++i) {
      const char c = opts[i];
      if (c == 'r') r.row_copies = true;
      else if (c == '2') r.per_sm = 2;
      else if (c == 'a') r.tile_absmax = true;
      else if (c == 'w') ++r.amax_warps;  // w: one absmax warp, ww: two
      else if (c == 'p' && i + 1 < opts.size()) r.pf = opts[++i] - '0';  // p<N>: absmax N stages ahead (tuning)
      else return kSkDefault;
    }
    return r;
  }
  if (std::sscanf(mode.c_str(), "w%dg%dpf%d", &v.warps, &v.group, &v.pf) != 3) v = kSkDefault;
  return v;
}

// Dynamic shared memory of a variant without x: the pair table (tile: 32 KB; stream-K: the 64 KB table and
// up to 64 KB of slack to its 64 KB boundary), the nested map, the two group-reduction buffers (ring: and its
// barriers and stages).
inline int sk_variant_smem(const SkVariant& v) {
  if (v.form == kNf4Ring) return ring_smem(v.warps, v.stages, v.amax_warps);
  return (v.form == kNf4Tile ? 256 * 128 : 2 * 256 * 256) + 256 * 4 + 2 * v.warps * 32 * 16;
}
// A ring block of a 2-per-SM variant gets at most this much (half of sm_90's 228 KB, less the 1 KB reserved per
// block); x is staged only when it fits in it.
constexpr int kRing2Max = 113 * 1024;
// A ring block of more than 6 stages (ring16s8r, a tuning variant) asks for sm_90's opt-in maximum (227 KB): 8 stages
// of 16 warps take 181 KB before x, which leaves L1 ~29 KB.
constexpr int kRing1Max = 227 * 1024;
// The largest tile-absmax slot the ring form takes (16 rows x 256 blocks: 16384 columns at blocksize 64).
constexpr int kRingTileAbsmaxMax = 4096;
// Bytes of the ring form's two tile-absmax slots for a weight of `cols` columns (after the stages, before x).
inline int64_t ring_absmax_slots_bytes(const SkVariant& v, int64_t cols, int64_t blocksize) {
  return v.tile_absmax ? 2 * ring_tile_absmax_bytes(cols, blocksize) : 0;
}
// The most a launch of the variant may ask for (stream-K and ring stage x when it fits in kSkXSmemMax; the ring
// form's two tile-absmax slots).
inline int sk_variant_smem_max(const SkVariant& v) {
  if (v.form == kNf4Ring && v.per_sm == 2) return kRing2Max;
  if (v.form == kNf4Ring && v.stages > 6) return kRing1Max;
  return sk_variant_smem(v) + (v.form == kNf4Tile ? 0 : kSkXSmemMax) + (v.tile_absmax ? 2 * kRingTileAbsmaxMax : 0);
}

template <typename XT, bool kNested, bool kBs64>
using SkKernel = void (*)(const SkArgs<kNested, kBs64>, const float*, const float*, const XT*, int, XT*);

template <typename XT, bool kNested, bool kBs64>
SkKernel<XT, kNested, kBs64> kernel_for(const SkVariant& v) {
  if constexpr (kNested && kBs64) {
    const char* mode = std::getenv("LOWBITPACK_NF4_SK_MODE");
    if (mode && mode[0] == '1' && v.warps == 16 && v.pf == 2) return nf4_gemv_sk_kernel<XT, kNested, kBs64, 16, 2, 1>;
    if (mode && mode[0] == '2' && v.warps == 16 && v.pf == 2) return nf4_gemv_sk_kernel<XT, kNested, kBs64, 16, 2, 2>;
  }
  if (v.form == kNf4Ring) return nullptr;  // ring_kernel_for
  if (v.form == kNf4Tile) {
    if (v.warps == 4) return nf4_gemv_sk_kernel<XT, kNested, kBs64, 4, 2, 0, true>;
    if (v.warps == 8) return nf4_gemv_sk_kernel<XT, kNested, kBs64, 8, 2, 0, true>;
    return nullptr;
  }
  if (v.warps == 24 && v.pf == 1) return nf4_gemv_sk_kernel<XT, kNested, kBs64, 24, 1>;
  if (v.warps == 16 && v.pf == 2) return nf4_gemv_sk_kernel<XT, kNested, kBs64, 16, 2>;
  if (v.warps == 8 && v.pf == 2) return nf4_gemv_sk_kernel<XT, kNested, kBs64, 8, 2>;
  return nullptr;
}

template <typename XT, bool kNested, bool kBs64>
using RingKernel = void (*)(const SkArgs<kNested, kBs64>, const CUtensorMap, const float*, const float*, const XT*, int,
                            XT*);

template <typename XT, bool kNested, bool kBs64, bool kXSmem>
RingKernel<XT, kNested, kBs64> ring_kernel_for(const SkVariant& v) {
  if (v.form != kNf4Ring) return nullptr;
  // Tile-absmax slots hold nested codes only; the plan drops `a` for plain absmax, so kA is never instantiated
  // with kNested false.
  constexpr bool kA = kNested;
  const bool a = v.tile_absmax && kNested;
  if (v.amax_warps) {  // ring16s6rww and ring8s6r2w only (ring16s6rw, one absmax warp for 16 consumers, measured
    // 15.6-15.9 us at 14336x4096 against 15.0 without: that warp could not keep up; docs/KERNELS.md, session 9)
    if (a || !v.row_copies || v.pf != kRingPF || v.stages != 6) return nullptr;
    if (v.amax_warps == 2 && v.warps == 16 && v.per_sm == 1)
      return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, kRingPF, kXSmem, 0, true, 1, false, 2>;
    if (v.amax_warps == 1 && v.warps == 8 && v.per_sm == 2)
      return nf4_gemv_ring_kernel<XT, kNested, kBs64, 8, 6, kRingPF, kXSmem, 0, true, 2, false, 1>;
    return nullptr;
  }
  if (v.pf != kRingPF) {  // ring16s6r[a]p3, the previous absmax prefetch distance (tuning); no other build takes p<N>
    if (v.pf != 3 || v.warps != 16 || v.stages != 6 || !v.row_copies || v.per_sm != 1) return nullptr;
    if (a) return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, 3, kXSmem, 0, true, 1, kA>;
    return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, 3, kXSmem, 0, true>;
  }
  if constexpr (kNested && kBs64) {
    const char* mode = std::getenv("LOWBITPACK_NF4_SK_MODE");
    const bool plain = !v.row_copies && v.per_sm == 1 && !v.tile_absmax;
    const bool rows = v.row_copies && v.per_sm == 1 && !v.tile_absmax;
    if (mode && mode[0] == '1' && v.warps == 16 && v.stages == 6 && plain)
      return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, kRingPF, kXSmem, 1>;
    if (mode && mode[0] == '2' && v.warps == 16 && v.stages == 6 && plain)
      return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, kRingPF, kXSmem, 2>;
    if (mode && mode[0] == '1' && v.warps == 16 && v.stages == 6 && rows)
      return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, kRingPF, kXSmem, 1, true>;
    if (mode && mode[0] == '2' && v.warps == 16 && v.stages == 6 && rows)
      return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, kRingPF, kXSmem, 2, true>;
  }
  if (v.warps == 8 && v.stages == 6 && v.row_copies && v.per_sm == 2) {
    if (a) return nf4_gemv_ring_kernel<XT, kNested, kBs64, 8, 6, kRingPF, kXSmem, 0, true, 2, kA>;
    return nf4_gemv_ring_kernel<XT, kNested, kBs64, 8, 6, kRingPF, kXSmem, 0, true, 2>;
  }
  if (v.per_sm != 1) return nullptr;
  if (v.warps == 16 && v.stages == 8 && v.row_copies && !a)
    return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 8, kRingPF, kXSmem, 0, true>;
  if (v.warps == 16 && v.stages == 6 && v.row_copies) {
    if (a) return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, kRingPF, kXSmem, 0, true, 1, kA>;
    return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, kRingPF, kXSmem, 0, true>;
  }
  if (a) return nullptr;
  if (v.warps == 16 && v.stages == 6) return nf4_gemv_ring_kernel<XT, kNested, kBs64, 16, 6, kRingPF, kXSmem>;
  if (v.warps == 8 && v.stages == 8) return nf4_gemv_ring_kernel<XT, kNested, kBs64, 8, 8, kRingPF, kXSmem>;
  return nullptr;
}
template <typename XT, bool kNested, bool kBs64>
RingKernel<XT, kNested, kBs64> ring_kernel_for(const SkVariant& v, bool x_smem) {
  return x_smem ? ring_kernel_for<XT, kNested, kBs64, true>(v) : ring_kernel_for<XT, kNested, kBs64, false>(v);
}
inline bool variant_exists(const SkVariant& v) {
  return v.form == kNf4Ring ? ring_kernel_for<__nv_bfloat16, true, true>(v, false) != nullptr
                            : kernel_for<__nv_bfloat16, true, true>(v) != nullptr;
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda); null if unavailable.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The ring form's view of the codes: 8-byte elements, [rows][cols / 16], boxes of 16 rows x (the stage's chunk
// + the pad), zeros out of bounds.
cudaError_t encode_codes_map(const Nf4Params& p, const Nf4GemvPlan& plan, CUtensorMap* map) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.cols / 16), static_cast<cuuint64_t>(p.rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.cols / 2)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>((64 * plan.warps + kRingRowPad) / 8), 16};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT64, 2, const_cast<uint8_t*>(p.packed), dims, strides, box,
                            elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename XT, bool kNested, bool kBs64>
cudaError_t run_sk(const Nf4Params& p, const Nf4GemvPlan& plan, const void* x, int m, void* y, float* partials,
                   int* counters, cudaStream_t stream) {
  SkArgs<kNested, kBs64> a{};
  a.packed = p.packed;
  a.absmax = p.absmax;
  a.absmax_code = p.absmax_code;
  a.nested_absmax = p.nested_absmax;
  a.offset = p.offset;
  a.bs_shift = log2_exact(p.blocksize);
  a.nbs_shift = kNested ? log2_exact(p.nested_blocksize) : 0;
  a.rows = p.rows;
  a.cols = p.cols;
  a.group = plan.group;
  // Steps of a tile: stream-K and tile form, one 128-column iteration per warp of the group; ring form,
  // one stage of `warps` iterations (the last one may be partial).
  const int64_t n_it = p.cols / 128;
  a.n_steps = static_cast<int>(plan.form == kNf4Ring ? (n_it + plan.warps - 1) / plan.warps : n_it / plan.group);
  a.total = static_cast<int>(plan.n_tiles * a.n_steps);
  a.partials = partials;
  a.counters = counters;
  a.x_smem = plan.x_smem;
  const SkVariant v{plan.warps,      plan.group,  plan.pf,         plan.form,
                    plan.stages,     plan.row_copies, plan.per_sm, plan.tile_absmax, plan.amax_warps};
  const int smem = sk_variant_smem(v) + static_cast<int>(ring_absmax_slots_bytes(v, p.cols, p.blocksize)) +
                   (plan.x_smem ? static_cast<int>(m * p.cols * 2) : 0);
  cudaError_t e;
  if (plan.form == kNf4Ring) {  // plus its producer warp and the codes' tensor map
    const auto kern = ring_kernel_for<XT, kNested, kBs64>(v, plan.x_smem);
    if (kern == nullptr) return cudaErrorInvalidValue;
    alignas(64) CUtensorMap map{};  // unused by the row-copy variant
    if (!plan.row_copies && (e = encode_codes_map(p, plan, &map)) != cudaSuccess) return e;
    if ((e = allow_smem(reinterpret_cast<const void*>(kern), sk_variant_smem_max(v))) != cudaSuccess) return e;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(plan.blocks));
    cfg.blockDim = dim3(static_cast<unsigned>((plan.warps + 1 + plan.amax_warps) * 32));
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = plan.pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kern, a, map, p.quant_map, p.nested_map, static_cast<const XT*>(x), m,
                              static_cast<XT*>(y));
  }
  const auto kern = kernel_for<XT, kNested, kBs64>(v);
  if (kern == nullptr) return cudaErrorInvalidValue;
  if ((e = allow_smem(reinterpret_cast<const void*>(kern), sk_variant_smem_max(v))) != cudaSuccess) return e;
  kern<<<plan.blocks, plan.warps * 32, smem, stream>>>(a, p.quant_map, p.nested_map, static_cast<const XT*>(x), m,
                                                       static_cast<XT*>(y));
  return cudaGetLastError();
}

template <typename XT>
cudaError_t run_sk_dtype(const Nf4Params& p, const Nf4GemvPlan& plan, const void* x, int m, void* y, float* partials,
                         int* counters, cudaStream_t stream) {
  const bool nested = p.absmax == nullptr, bs64 = p.blocksize == 64;
  if (nested && bs64) return run_sk<XT, true, true>(p, plan, x, m, y, partials, counters, stream);
  if (nested) return run_sk<XT, true, false>(p, plan, x, m, y, partials, counters, stream);
  if (bs64) return run_sk<XT, false, true>(p, plan, x, m, y, partials, counters, stream);
  return run_sk<XT, false, false>(p, plan, x, m, y, partials, counters, stream);
}

}  // namespace

Nf4GemvPlan nf4_gemv_plan(const Nf4Params& p, int64_t m, int x_dtype, const void* x) {
  Nf4GemvPlan plan{};
  // Which kernel runs, from the H100 measurements (docs/KERNELS.md, iterations 4 and 5), unless
  // LOWBITPACK_NF4_SK says (off: never; on: stream-K wherever it applies; tile<N>, w<W>g<G>pf<P> or
  // ring<W>s<S>[r]: that variant). For weights of >= 2^24 elements:
  // - on sm_90, the ring form with per-row bulk copies (ring16s6r): 1 token 14336x4096 16.9 us against 25.8
  //   for the generic core, 4096x14336 15.8 against 20.7 for tile8, 32768x16384 120 against 138 for
  //   stream-K; 8 tokens within 1% of tile8 or faster. Below 2^25 elements, two blocks of 8 consumer warps
  //   per SM (ring8s6r2): 4096x4096 6.8 against 7.5 us (ring16s6r) at 1 token, 8.5 against 9.3 at 8;
  // - before sm_90: one block per tile (tile8) when the tiles fit in two per SM; stream-K for m >= 4 on
  //   >= 2^25 elements and for any m on >= 2^28; else the generic core.
  // Smaller weights keep the generic core (not measured).
  const char* env = std::getenv("LOWBITPACK_NF4_SK");
  const std::string mode = env ? env : "";
  if (mode == "off") return plan;
  const int64_t numel = p.rows * p.cols;
  const bool nested = p.absmax == nullptr;
  const auto addr = [](const void* q) { return reinterpret_cast<uintptr_t>(q); };
  if (m < 1 || m > 8 || (x_dtype != kBF16 && x_dtype != kF16)) return plan;
  if (p.cols % 128 != 0 || p.cols / 128 >= (int64_t(1) << 30) || p.rows < 1) return plan;
  if (log2_exact(p.blocksize) < 6 || (nested && log2_exact(p.nested_blocksize) < 1)) return plan;
  if (addr(p.packed) % 16 != 0 || addr(x) % 16 != 0) return plan;
  if (nested ? addr(p.absmax_code) % 2 != 0 : addr(p.absmax) % 8 != 0) return plan;
  const int64_t n_tiles = (p.rows + 15) / 16;
  const int64_t total = n_tiles * (p.cols / 128);
  if (total >= (int64_t(1) << 31) / 8 || numel >> log2_exact(p.blocksize) >= (int64_t(1) << 32)) return plan;

  // Device facts, read once per device.
  static int sms_of[64] = {0}, smem_of[64] = {0}, major_of[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) {
    cudaGetLastError();
    return plan;
  }
  if (sms_of[dev] == 0 &&
      (cudaDeviceGetAttribute(&smem_of[dev], cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
       cudaDeviceGetAttribute(&major_of[dev], cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
       cudaDeviceGetAttribute(&sms_of[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)) {
    cudaGetLastError();  // the generic path runs instead
    sms_of[dev] = 0;
    return plan;
  }
  const int sms = sms_of[dev];
  // The ring form needs sm_90 (mbarrier transaction counts, tensor copies) and the driver's tensor-map
  // encoder; its tensor map's rows and coordinates are 32-bit, and the box (16 rows x the stage's chunk and
  // its pad) must fit in the tensor.
  // The tile-absmax slots need nested absmax, whole tiles (the slot copy covers 16 rows), 16-byte aligned codes
  // and slots of at most kRingTileAbsmaxMax bytes. A variant that asks for them where they do not apply fetches
  // its absmax per warp instead.
  const auto ring_adapt = [&](SkVariant r) {
    if (r.form != kNf4Ring) return r;
    if (r.tile_absmax && !(nested && p.rows % 16 == 0 && addr(p.absmax_code) % 16 == 0 &&
                           ring_tile_absmax_bytes(p.cols, p.blocksize) <= kRingTileAbsmaxMax))
      r.tile_absmax = false;
    return r;
  };
  const auto ring_fits = [&](const SkVariant& r) {
    return major_of[dev] >= 9 && (r.row_copies || tensor_map_encoder() != nullptr) && p.rows < (int64_t(1) << 31) &&
           p.rows >= 16 &&
           p.cols / 2 >= 64 * r.warps + kRingRowPad && smem_of[dev] >= sk_variant_smem_max(r);
  };
  // Tile-absmax slots where they measured faster. Since the consumer loop lost its per-stage branches
  // (docs/KERNELS.md, session 7), they pay only with several tokens and x over 16 KB (4096x14336, 2 tokens: 14.7
  // against 17.4 us; 8 tokens 17.6 against 19.6; 14336x4096, 8 tokens: 18.4 against 19.0), not with x of 16 KB
  // (14336x4096, 2 tokens: 15.9 against 15.6) or 1 token (32768x16384: 113.3 against 112.3).
  const char* xs = std::getenv("LOWBITPACK_NF4_SK_XSMEM");  // tuning: 0 keeps x in global memory
  const bool x_off = xs && xs[0] == '0';
  const bool slots = m >= 2 && m * p.cols * 2 > 16 * 1024;
  // Absmax warps (docs/KERNELS.md, session 9; harness on bitsandbytes-quantized normal weights): one for the 2-per-SM
  // form (ring8s6r2w), the default below 2^25 elements and, at 1 token, wherever whole tiles split evenly over two
  // blocks per SM (within 5%): 4096x4096 5.2 against 5.8 us (ring8s6r2), 8192x8192 15.3 against 16.7 (ring16s6r),
  // 32768x16384 107.2 against 113.5. Else two for the 16-warp form (ring16s6rww) for rows of at most 8192 columns
  // and weights of >= 2^28 elements: 1 token 14336x4096 (896 tiles: 3 or 4 a block of 264) 14.5 against 15.0 us;
  // 8 tokens 14336x4096 17.2 against 18.3 (slots), 8192x8192 19.6 against 21.1, 32768x16384 130 against 137.
  const bool ww = p.cols <= 8192 || numel >= (int64_t(1) << 28);
  const int64_t blocks2 = imin64(2 * static_cast<int64_t>(sms), n_tiles);
  const bool even2 = (n_tiles + blocks2 - 1) / blocks2 * blocks2 * 100 <= n_tiles * 105;
  const SkVariant ring16 = ring_adapt(ww ? SkVariant{16, 16, kRingPF, kNf4Ring, 6, true, 1, false, 2}
                                         : SkVariant{16, 16, kRingPF, kNf4Ring, 6, true, 1, slots});
  const SkVariant ring8x2 = ring_adapt(SkVariant{8, 8, kRingPF, kNf4Ring, 6, true, 2, false, 1});
  const SkVariant tile8{8, 8, 2, kNf4Tile};
  SkVariant v = ring_adapt(parse_variant(mode));
  if (mode.empty()) {
    const bool big = numel >= (int64_t(1) << 24), few = n_tiles <= 2 * sms;
    if (big && (numel < (int64_t(1) << 25) || (m == 1 && even2)) && ring_fits(ring8x2))
      v = ring8x2;
    else if (big && ring_fits(ring16))
      v = ring16;
    else if (big && few && (p.cols / 128) % 8 == 0)
      v = tile8;
    else if (!((m >= 4 && numel >= (int64_t(1) << 25)) || numel >= (int64_t(1) << 28)))
      return plan;
  }
  if (!variant_exists(v) || v.group < 1 || v.warps % v.group != 0) v = kSkDefault;
  if (smem_of[dev] < sk_variant_smem_max(v)) return plan;
  if (v.form == kNf4Ring && !ring_fits(v)) return plan;
  int64_t blocks = n_tiles;
  if (v.form == kNf4Tile) {  // the block's warps are one group: they must split a tile's iterations evenly
    if ((p.cols / 128) % v.warps != 0 || n_tiles >= (int64_t(1) << 31)) return plan;
  } else if (v.form == kNf4Ring) {  // persistent, whole tiles: one block per SM, at most one per tile
    blocks = imin64(static_cast<int64_t>(v.per_sm) * sms, n_tiles);
  } else {
    // The group must divide the iterations of a tile; a smaller one is used when it does not.
    while (v.group > 1 && (p.cols / 128) % v.group != 0) v.group /= 2;
    const int64_t steps = n_tiles * (p.cols / 128 / v.group);
    // Persistent: one block per SM, every group with at least one step (a tile's contributors are counted
    // from the split, so an empty group would never arrive).
    blocks = imin64(sms, steps / (v.warps / v.group));
  }
  if (blocks < 1) return plan;
  plan.ok = true;
  plan.blocks = static_cast<int>(blocks);
  plan.n_tiles = n_tiles;
  plan.warps = v.warps;
  plan.group = v.group;
  plan.pf = v.pf;
  plan.form = v.form;
  plan.stages = v.stages;
  plan.row_copies = v.row_copies;
  plan.per_sm = v.per_sm;
  plan.tile_absmax = v.tile_absmax;
  plan.amax_warps = v.amax_warps;
  // The ring form is launched with programmatic dependent launch unless LOWBITPACK_NF4_SK_PDL=0: its launch and
  // barrier set-up overlap the kernel before it (it touches no global memory before griddepcontrol.wait).
  // 14336x4096, 1 token: 16.1 against 17.0 us back to back (docs/KERNELS.md, session 6).
  const char* pdl = std::getenv("LOWBITPACK_NF4_SK_PDL");
  plan.pdl = v.form == kNf4Ring && !(pdl && pdl[0] == '0');
  plan.x_smem = v.form != kNf4Tile && m * p.cols * 2 <= kSkXSmemMax && !x_off &&
                sk_variant_smem(v) + ring_absmax_slots_bytes(v, p.cols, p.blocksize) + m * p.cols * 2 <=
                    sk_variant_smem_max(v);
  // Only stream-K shares tiles between blocks.
  plan.partial_floats = v.form == kNf4StreamK ? blocks * (v.warps / v.group) * 2 * 128 : 0;
  return plan;
}

cudaError_t nf4_gemv_sk(const Nf4Params& p, const Nf4GemvPlan& plan, const void* x, int64_t m, int x_dtype, void* y,
                        float* partials, int* counters, cudaStream_t stream) {
  if (!plan.ok) return cudaErrorInvalidValue;
  if (x_dtype == kBF16)
    return run_sk_dtype<__nv_bfloat16>(p, plan, x, static_cast<int>(m), y, partials, counters, stream);
  return run_sk_dtype<__half>(p, plan, x, static_cast<int>(m), y, partials, counters, stream);
}

#ifdef LOWBIT_RING_TRACE
// Summary of the ring kernel's last launch (tuning: bench/gemv_exp.sh trace).
void ring_trace_dump(int blocks) {
  static unsigned long long h[kTraceBlocks][kTraceSlots];
  if (cudaMemcpyFromSymbol(h, g_ring_trace, sizeof(h)) != cudaSuccess) return;
  blocks = blocks < kTraceBlocks ? blocks : kTraceBlocks;
  unsigned long long g0 = ~0ull, g1 = 0, g1min = ~0ull;
  double wait = 0, first = 0, tables = 0, loop = 0, cwait = 0, pwait = 0;
  for (int b = 0; b < blocks; ++b) {
    g0 = std::min(g0, h[b][0]);
    g1 = std::max(g1, h[b][1]);
    g1min = std::min(g1min, h[b][1]);
    wait += h[b][3] - h[b][2];
    tables += h[b][4] - h[b][3];
    first += h[b][8] - h[b][3];
    loop += h[b][5] - h[b][8];
    cwait += h[b][7];
    pwait += h[b][60];
  }
  std::printf("  trace (%d blocks, clocks, means): entry->wait done %.0f, wait->tables %.0f, wait->first stage %.0f, "
              "first stage->loop end %.0f; consumer warp 0 waited %.0f on full stages, the producer %.0f on empty "
              "ones; globaltimer: first entry to last loop end %.2f us, loop ends spread %.2f us\n",
              blocks, wait / blocks, tables / blocks, first / blocks, loop / blocks, cwait / blocks, pwait / blocks,
              (g1 - g0) / 1e3, (g1 - g1min) / 1e3);
  std::printf("  block 0, %llu stages: consumer past stage s's wait (from the first), producer past stage s's empty "
              "wait:\n   ", h[0][6]);
  const int shown = std::min(20, static_cast<int>(h[0][6]));
  for (int i = 0; i < shown; ++i) std::printf(" %lld", static_cast<long long>(h[0][8 + i] - h[0][8]));
  std::printf("\n   ");
  for (int i = 0; i < shown; ++i) std::printf(" %lld", static_cast<long long>(h[0][32 + i] - h[0][8]));
  std::printf("\n");
}
#endif
}  // namespace lowbit
