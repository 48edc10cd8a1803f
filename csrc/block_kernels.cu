// CUDA kernels of the block primitive (docs/block-engine.md): one anchors × keys block.
//
//   forward:  one CTA per anchor tile walks the key tiles: S tile = A·Kᵀ (tensor cores, D in chunks), then
//             each anchor row folds the tile into its running max / sum / positive sums (block_math.cuh).
//   backward: dâ pass — one CTA per (anchor tile, output-feature slice) recomputes S per key tile, forms
//             T = G·prescale in the rows' dtype and accumulates T·K̂[:, slice]; dk̂ pass — one CTA per (key
//             tile, slice) walks the anchor tiles and accumulates Tᵀ·Â[:, slice]. Each output element is
//             owned by one CTA and summed in a fixed order: deterministic, no atomics. Both passes compute
//             S through the same function over the same tiles, so G is the same in both.
//             A row pass then applies the normalization's backward in place.
//
// Math paths: float16 / bfloat16 rows → WMMA 16×16×16 (fp32 accumulation); float32 rows → WMMA TF32
// 16×16×8 with each operand split into TF32 high and low parts, three products (3xTF32, about fp32
// accuracy: the default), one TF32 product when PyTorch allows TF32 for matmuls, or FMA on the CUDA cores
// when PyTorch's fp32 matmul precision is "ieee"; float64 → FMA. sm_80 and sm_90 run the same mma.sync
// code (no wgmma).
#include <type_traits>

#include "block_launch.h"
#include "block_math.cuh"

// csrc/kernel_emulation.cpp compiles this file for the host with FASTCL_HOST_EMULATION set, after
// defining the CUDA names used here (WMMA included): the tests then run these very kernels on the CPU.
#ifndef FASTCL_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define FASTCL_LAUNCH(kernel, grid, stream, ...) kernel<<<grid, kThreads, 0, stream>>>(__VA_ARGS__)
#endif

namespace fastcl {
namespace {

constexpr int kThreads = 128;  // 4 warps; every tile shape below assumes it

enum MathPath { kFma = 0, kWmma16 = 1, kWmmaTf32 = 2, kWmmaTf32x3 = 3 };

// Tile shapes per path. kRows: anchor and key tile (equal, so the dk̂ pass reuses the warp layout);
// kChunk: features per S chunk; kSlice: output features per backward CTA. Shared memory stays under the
// 48 KiB static limit (README table).
template <typename scalar_t, int kPath>
struct Config {
  using scalar = scalar_t;
  using acc = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  static constexpr int path = kPath;
  static constexpr int kRows = std::is_same<scalar_t, double>::value ? 32 : 64;
  static constexpr int kChunk = kPath == kFma ? 16 : 32;
  // Wider slices spill (bfloat16 at 128) or exceed the TF32 kernels' registers.
  static constexpr int kSlice = kPath == kWmmaTf32 || kPath == kWmmaTf32x3 ? 32 : 64;
  static constexpr int kPad = 16 / sizeof(scalar_t);  // keeps WMMA leading dimensions multiples of 16 bytes
  static constexpr int kAccPad = 16 / sizeof(acc);
  static constexpr int kLdChunk = kChunk + kPad;
  static constexpr int kLdScores = kRows + kAccPad;
  static constexpr int kLdSlice = kSlice + kPad;
  static constexpr int kThreadsPerRow = kThreads / kRows;   // the row epilogue splits a row's columns
  static constexpr int kColsPerThread = kRows / kThreadsPerRow;
  // T (the second GEMM's operand) gets its own buffer only when it is narrower than the accumulator.
  static constexpr bool kSeparateT = !std::is_same<scalar_t, acc>::value;
  static constexpr int kLdT = kSeparateT ? kRows + kPad : kLdScores;
  static_assert(kRows % 16 == 0 && kSlice % 16 == 0 && kChunk % 16 == 0, "tiles are multiples of 16");
  static_assert(kThreads % kRows == 0, "whole rows per thread group");
  static_assert(kPath == kFma || kRows == 16 * (kThreads / 32), "WMMA paths: one 16-row strip per warp");
};

template <class Cfg>
struct Smem {
  using scalar_t = typename Cfg::scalar;
  using acc_t = typename Cfg::acc;
  static constexpr int kChunkElements = Cfg::kRows * Cfg::kLdChunk;
  static constexpr int kSliceElements = Cfg::kRows * Cfg::kLdSlice;
  // S's operand chunks (a, k) and the second GEMM's slice are never live at the same time: one buffer.
  static_assert(kChunkElements * sizeof(scalar_t) % 128 == 0, "k() keeps WMMA's 32-byte pointer alignment");
  alignas(128) scalar_t operands[2 * kChunkElements > kSliceElements ? 2 * kChunkElements : kSliceElements];
  alignas(128) acc_t scores[Cfg::kRows * Cfg::kLdScores];  // S, then T when kSeparateT is false
  alignas(128) scalar_t t[Cfg::kSeparateT ? Cfg::kRows * Cfg::kLdT : 1];

  __device__ __forceinline__ scalar_t* a() { return operands; }
  __device__ __forceinline__ scalar_t* k() { return operands + kChunkElements; }
  __device__ __forceinline__ scalar_t* slice() { return operands; }
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}

template <typename scalar_t>
struct ToOperand {
  template <typename acc_t>
  __device__ scalar_t operator()(acc_t x) const { return static_cast<scalar_t>(x); }
};

template <typename scalar_t, typename acc_t>
struct Rows {
  const scalar_t* data;
  int64_t count;
  int64_t stride_row;
  int64_t stride_dim;
  const acc_t* inv;
};

// tile[r][c] = rows[row0 + r][col0 + c] (scaled by the row's inverse norm when `scaled`), zero outside the
// rows and the sub_dim prefix. Consecutive threads read consecutive features (coalesced for unit stride).
template <class Cfg, int kTileRows, int kTileCols, int kLd, bool kScaled>
__device__ __forceinline__ void load_tile(typename Cfg::scalar* tile,
                                          const Rows<typename Cfg::scalar, typename Cfg::acc>& rows, int64_t row0,
                                          int64_t col0, int64_t sub_dim) {
  using scalar_t = typename Cfg::scalar;
  using acc_t = typename Cfg::acc;
  for (int i = threadIdx.x; i < kTileRows * kTileCols; i += kThreads) {
    const int r = i / kTileCols;
    const int c = i % kTileCols;
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    scalar_t value = ToOperand<scalar_t>()(acc_t(0));
    if (row < rows.count && col < sub_dim) {
      value = rows.data[row * rows.stride_row + col * rows.stride_dim];
      if (kScaled && rows.inv) value = ToOperand<scalar_t>()(to_acc<scalar_t, acc_t>(value) * rows.inv[row]);
    }
    tile[r * kLd + c] = value;
  }
}

// --- S = A·Kᵀ for one (anchor tile, key tile) into shared memory -----------------------------------------

// --- FMA paths: a register tile per thread ---------------------------------------------------------------

// A [16·kRowsPerThread, 8·kColsPerThread] product in registers, 128 threads as 16 × 8: thread (ty, tx)
// holds rows ty + 16i and columns tx + 8j (interleaved, so a warp's shared-memory reads spread over banks).
template <typename acc_t, int kRowsPerThread, int kColsPerThread>
struct FmaTile {
  acc_t sums[kRowsPerThread][kColsPerThread] = {};
  int ty = threadIdx.x / 8, tx = threadIdx.x % 8;

  // sums[i][j] += Σ_{inner < kInner} lhs(row_i, inner) · rhs(inner, col_j).
  template <int kInner, typename Lhs, typename Rhs>
  __device__ __forceinline__ void accumulate(Lhs lhs, Rhs rhs) {
#pragma unroll 4
    for (int inner = 0; inner < kInner; ++inner) {
      acc_t lv[kRowsPerThread], rv[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) lv[i] = lhs(ty + 16 * i, inner);
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) rv[j] = rhs(inner, tx + 8 * j);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) sums[i][j] = fma(lv[i], rv[j], sums[i][j]);
    }
  }

  // store(row, col, value) for every element this thread holds.
  template <typename Store>
  __device__ __forceinline__ void for_each(Store store) const {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) store(ty + 16 * i, tx + 8 * j, sums[i][j]);
  }
};

// The dot products of one (anchor tile, key tile) held in registers while similarity_tile walks the
// features in kChunk steps: zeroed, one chunk from shared memory added, stored to smem.scores[r][c]
// (FMA path here, WMMA paths below).
template <class Cfg, bool kFmaPath = Cfg::path == kFma>
struct Similarity;

template <class Cfg>
struct Similarity<Cfg, true> : FmaTile<typename Cfg::acc, Cfg::kRows / 16, Cfg::kRows / 8> {
  __device__ __forceinline__ void add_chunk(Smem<Cfg>& smem) {
    const auto* a = smem.a();
    const auto* k = smem.k();
    this->template accumulate<Cfg::kChunk>([&](int r, int d) { return a[r * Cfg::kLdChunk + d]; },
                                           [&](int d, int c) { return k[c * Cfg::kLdChunk + d]; });
  }

  __device__ __forceinline__ void store(Smem<Cfg>& smem) const {
    this->for_each([&](int r, int c, typename Cfg::acc value) { smem.scores[r * Cfg::kLdScores + c] = value; });
  }
};

// Raw dot products of anchors a0.. against keys k0.. over all sub_dim features, in smem.scores. Every
// thread calls it; returns after a barrier (S readable).
template <class Cfg>
__device__ void similarity_tile(Smem<Cfg>& smem, const Rows<typename Cfg::scalar, typename Cfg::acc>& a,
                                const Rows<typename Cfg::scalar, typename Cfg::acc>& k, int64_t a0, int64_t k0,
                                int64_t sub_dim) {
  Similarity<Cfg> dots;
  for (int64_t d0 = 0; d0 < sub_dim; d0 += Cfg::kChunk) {
    load_tile<Cfg, Cfg::kRows, Cfg::kChunk, Cfg::kLdChunk, false>(smem.a(), a, a0, d0, sub_dim);
    load_tile<Cfg, Cfg::kRows, Cfg::kChunk, Cfg::kLdChunk, false>(smem.k(), k, k0, d0, sub_dim);
    __syncthreads();
    dots.add_chunk(smem);
    __syncthreads();
  }
  dots.store(smem);
  __syncthreads();
}

// --- second GEMM: out[R, kSlice] += T·slice (dâ pass) or Tᵀ·slice (dk̂ pass) ---------------------------

template <class Cfg>
__device__ __forceinline__ typename Cfg::scalar* operand_t(Smem<Cfg>& smem) {
  if constexpr (Cfg::kSeparateT) {
    return smem.t;
  } else {
    return smem.scores;
  }
}

template <class Cfg, bool kFmaPath = Cfg::path == kFma>
struct SliceAccumulator;

template <class Cfg>
struct SliceAccumulator<Cfg, true> : FmaTile<typename Cfg::acc, Cfg::kRows / 16, Cfg::kSlice / 8> {
  using acc_t = typename Cfg::acc;

  template <bool kTransposed>
  __device__ __forceinline__ void add(Smem<Cfg>& smem) {
    const acc_t* t = operand_t(smem);
    const acc_t* slice = smem.slice();
    this->template accumulate<Cfg::kRows>(
        [&](int row, int inner) { return kTransposed ? t[inner * Cfg::kLdT + row] : t[row * Cfg::kLdT + inner]; },
        [&](int inner, int col) { return slice[inner * Cfg::kLdSlice + col]; });
  }

  // out[row0 + r][col0 + c] = sums · scale for rows < count, columns < sub_dim.
  __device__ __forceinline__ void store(Smem<Cfg>&, acc_t* out, int64_t row0, int64_t count, int64_t col0,
                                        int64_t sub_dim, acc_t scale) const {
    this->for_each([&](int r, int c, acc_t value) {
      const int64_t row = row0 + r, col = col0 + c;
      if (row < count && col < sub_dim) out[row * sub_dim + col] = value * scale;
    });
  }
};

// --- WMMA paths (16-bit and TF32): tensor-core tiles ----------------------------------------------------

using namespace nvcuda;

template <>
__device__ __forceinline__ float to_acc<__half, float>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16, float>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
struct ToOperand<__half> {
  __device__ __half operator()(float x) const { return __float2half_rn(x); }
};
template <>
struct ToOperand<__nv_bfloat16> {
  __device__ __nv_bfloat16 operator()(float x) const { return __float2bfloat16_rn(x); }
};

template <typename scalar_t>
struct Wmma {
  using element = scalar_t;
  static constexpr int kStep = 16;
};
template <>
struct Wmma<float> {
  using element = wmma::precision::tf32;
  static constexpr int kStep = 8;
};

template <typename scalar_t, typename Use, typename Layout>
using Operand = wmma::fragment<Use, 16, 16, Wmma<scalar_t>::kStep, typename Wmma<scalar_t>::element, Layout>;
template <typename scalar_t>
using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, Wmma<scalar_t>::kStep, float>;

// One WMMA operand as the math path multiplies it: 16-bit values as loaded, TF32 rounded, or (3xTF32) the
// fp32 value split into x ≈ hi + lo, both TF32 (lo is unused, and compiled away, on the other paths).
template <class Cfg, typename Use, typename Layout>
struct WmmaOperand {
  using scalar_t = typename Cfg::scalar;
  Operand<scalar_t, Use, Layout> hi;
  Operand<scalar_t, Use, Layout> lo;

  __device__ __forceinline__ void load(const scalar_t* pointer, int ld) {
    wmma::load_matrix_sync(hi, pointer, ld);
    if constexpr (Cfg::path == kWmmaTf32) {
      for (int i = 0; i < hi.num_elements; ++i) hi.x[i] = wmma::__float_to_tf32(hi.x[i]);
    } else if constexpr (Cfg::path == kWmmaTf32x3) {
      for (int i = 0; i < hi.num_elements; ++i) {
        const float x = hi.x[i];
        hi.x[i] = wmma::__float_to_tf32(x);
        lo.x[i] = wmma::__float_to_tf32(x - hi.x[i]);
      }
    }
  }
};

// acc += lhs·rhs; 3xTF32 adds the two cross terms first (the small ones), then hi·hi (lo·lo is below fp32).
template <class Cfg, typename Acc, typename Lhs, typename Rhs>
__device__ __forceinline__ void multiply(Acc& acc, const Lhs& lhs, const Rhs& rhs) {
  if constexpr (Cfg::path == kWmmaTf32x3) {
    wmma::mma_sync(acc, lhs.lo, rhs.hi, acc);
    wmma::mma_sync(acc, lhs.hi, rhs.lo, acc);
  }
  wmma::mma_sync(acc, lhs.hi, rhs.hi, acc);
}

template <class Cfg>
struct Similarity<Cfg, false> {
  using scalar_t = typename Cfg::scalar;
  Accumulator<scalar_t> dots[Cfg::kRows / 16];  // this warp's 16 rows × every column of the tile
  int warp = threadIdx.x / 32;

  __device__ Similarity() {
#pragma unroll
    for (int j = 0; j < Cfg::kRows / 16; ++j) wmma::fill_fragment(dots[j], 0.0f);
  }

  __device__ __forceinline__ void add_chunk(Smem<Cfg>& smem) {
#pragma unroll
    for (int kk = 0; kk < Cfg::kChunk; kk += Wmma<scalar_t>::kStep) {
      WmmaOperand<Cfg, wmma::matrix_a, wmma::row_major> lhs;
      lhs.load(smem.a() + warp * 16 * Cfg::kLdChunk + kk, Cfg::kLdChunk);
#pragma unroll
      for (int j = 0; j < Cfg::kRows / 16; ++j) {
        WmmaOperand<Cfg, wmma::matrix_b, wmma::col_major> rhs;  // Kᵀ: element (d, c) at k[c][d]
        rhs.load(smem.k() + j * 16 * Cfg::kLdChunk + kk, Cfg::kLdChunk);
        multiply<Cfg>(dots[j], lhs, rhs);
      }
    }
  }

  __device__ __forceinline__ void store(Smem<Cfg>& smem) const {
#pragma unroll
    for (int j = 0; j < Cfg::kRows / 16; ++j)
      wmma::store_matrix_sync(smem.scores + warp * 16 * Cfg::kLdScores + j * 16, dots[j], Cfg::kLdScores,
                              wmma::mem_row_major);
  }
};

template <class Cfg>
struct SliceAccumulator<Cfg, false> {
  using scalar_t = typename Cfg::scalar;
  using acc_t = typename Cfg::acc;
  Accumulator<scalar_t> sums[Cfg::kSlice / 16];

  __device__ SliceAccumulator() {
#pragma unroll
    for (int j = 0; j < Cfg::kSlice / 16; ++j) wmma::fill_fragment(sums[j], 0.0f);
  }

  template <bool kTransposed>
  __device__ __forceinline__ void add(Smem<Cfg>& smem) {
    const int warp = threadIdx.x / 32;
    const scalar_t* t = operand_t(smem);
    constexpr int ld = Cfg::kLdT;
#pragma unroll
    for (int kk = 0; kk < Cfg::kRows; kk += Wmma<scalar_t>::kStep) {
      using LhsLayout = typename std::conditional<kTransposed, wmma::col_major, wmma::row_major>::type;
      WmmaOperand<Cfg, wmma::matrix_a, LhsLayout> lhs;
      // Tᵀ[warp rows][kk..]: element (row, inner) of Tᵀ is t[inner][row], i.e. column-major with ld.
      lhs.load(kTransposed ? t + kk * ld + warp * 16 : t + warp * 16 * ld + kk, ld);
#pragma unroll
      for (int j = 0; j < Cfg::kSlice / 16; ++j) {
        WmmaOperand<Cfg, wmma::matrix_b, wmma::row_major> rhs;
        rhs.load(smem.slice() + kk * Cfg::kLdSlice + j * 16, Cfg::kLdSlice);
        multiply<Cfg>(sums[j], lhs, rhs);
      }
    }
  }

  // Stages the fragments through smem.scores (free after the last tile), kRows columns at a time, then
  // stores them with masks.
  __device__ __forceinline__ void store(Smem<Cfg>& smem, acc_t* out, int64_t row0, int64_t count, int64_t col0,
                                        int64_t sub_dim, acc_t scale) {
    constexpr int kWidth = Cfg::kSlice < Cfg::kRows ? Cfg::kSlice : Cfg::kRows;
    static_assert(Cfg::kSlice % kWidth == 0, "the slice is staged in whole rounds");
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int staged = 0; staged < Cfg::kSlice; staged += kWidth) {
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kWidth / 16; ++j)
        wmma::store_matrix_sync(smem.scores + warp * 16 * Cfg::kLdScores + j * 16, sums[staged / 16 + j],
                                Cfg::kLdScores, wmma::mem_row_major);
      __syncthreads();
      for (int i = threadIdx.x; i < Cfg::kRows * kWidth; i += kThreads) {
        const int r = i / kWidth, c = i % kWidth;
        const int64_t row = row0 + r, col = col0 + staged + c;
        if (row < count && col < sub_dim) out[row * sub_dim + col] = smem.scores[r * Cfg::kLdScores + c] * scale;
      }
    }
  }
};

// --- kernel arguments ---------------------------------------------------------------------------------------

template <class Cfg>
struct KernelArgs {
  using scalar_t = typename Cfg::scalar;
  using acc_t = typename Cfg::acc;
  Rows<scalar_t, acc_t> a;
  Rows<scalar_t, acc_t> k;
  int64_t sub_dim;
  const acc_t* tau;
  const acc_t* bias;
  BlockLayout<acc_t> layout;
  // forward outputs
  acc_t* lse;
  acc_t* pos_sum;
  acc_t* pos_weight;
  // backward inputs and outputs
  const acc_t* lse_in;
  const acc_t* alpha;
  const acc_t* beta;
  acc_t* d_a;
  acc_t* d_k;
  acc_t* grad_sums;
};

template <class Cfg>
__device__ __forceinline__ BlockLayout<typename Cfg::acc> device_layout(const KernelArgs<Cfg>& args) {
  BlockLayout<typename Cfg::acc> layout = args.layout;
  layout.bias = args.bias ? *args.bias : typename Cfg::acc(0);
  return layout;
}

// The row epilogue's thread layout: kThreadsPerRow neighbouring threads (one warp) share a tile row, each
// taking kColsPerThread consecutive columns.
template <class Cfg>
struct RowThreads {
  int row = threadIdx.x / Cfg::kThreadsPerRow;
  int first_col = (threadIdx.x % Cfg::kThreadsPerRow) * Cfg::kColsPerThread;
};

// Combines the statistics of one row's kThreadsPerRow neighbouring threads (same warp) by shuffles.
template <class Cfg, typename acc_t>
__device__ __forceinline__ void merge_row_threads(RowStats<acc_t>& stats, int epilogue) {
#pragma unroll
  for (int lane_mask = 1; lane_mask < Cfg::kThreadsPerRow; lane_mask <<= 1) {
    RowStats<acc_t> other;
    other.max = __shfl_xor_sync(0xffffffffu, stats.max, lane_mask);
    other.sum = __shfl_xor_sync(0xffffffffu, stats.sum, lane_mask);
    other.pos_sum = __shfl_xor_sync(0xffffffffu, stats.pos_sum, lane_mask);
    other.pos_weight = __shfl_xor_sync(0xffffffffu, stats.pos_weight, lane_mask);
    stats.merge(other, epilogue);
  }
}

template <class Cfg, typename acc_t>
__device__ __forceinline__ acc_t sum_row_threads(acc_t value) {
#pragma unroll
  for (int lane_mask = 1; lane_mask < Cfg::kThreadsPerRow; lane_mask <<= 1)
    value += __shfl_xor_sync(0xffffffffu, value, lane_mask);
  return value;
}

// --- forward ------------------------------------------------------------------------------------------------

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1) block_forward_kernel(const KernelArgs<Cfg> args) {
  using acc_t = typename Cfg::acc;
  __shared__ Smem<Cfg> smem;
  const BlockLayout<acc_t> layout = device_layout(args);
  const int64_t a0 = int64_t(blockIdx.x) * Cfg::kRows;
  const RowThreads<Cfg> me;
  const int64_t anchor = a0 + me.row;
  const bool valid = anchor < args.a.count;
  const acc_t scale = valid ? row_scale<acc_t>(args.a.inv, anchor, acc_t(1) / *args.tau) : acc_t(0);
  RowStats<acc_t> stats = RowStats<acc_t>::empty();
  for (int64_t k0 = 0; k0 < args.k.count; k0 += Cfg::kRows) {
    similarity_tile(smem, args.a, args.k, a0, k0, args.sub_dim);
    const int64_t c0 = k0 + me.first_col;
    const int n = int(min(int64_t(Cfg::kColsPerThread), args.k.count - c0));
    const acc_t* dots = smem.scores + me.row * Cfg::kLdScores + me.first_col;
    if (valid && n > 0) accumulate_row_tile<acc_t>(stats, layout, anchor, c0, n, dots, scale, args.k.inv);
    __syncthreads();
  }
  merge_row_threads<Cfg>(stats, layout.epilogue);
  if (valid && me.first_col == 0) {
    args.lse[anchor] = stats.finish(layout.epilogue);
    args.pos_sum[anchor] = stats.pos_sum;
    args.pos_weight[anchor] = stats.pos_weight;
  }
}

// --- backward -----------------------------------------------------------------------------------------------

// One (anchor tile a0, key tile k0) step of a backward pass: S, then this thread's part of T = G·prescale
// for its anchor row (zeros outside the block, so the GEMM over the whole tile adds nothing for them;
// Σ G·s and Σ G are added to the running sums), then out += T·K̂[k0.., slice] (anchor pass) or
// Tᵀ·Â[a0.., slice] (key pass).
template <class Cfg, bool kKeyPass>
__device__ __forceinline__ void backward_tile(Smem<Cfg>& smem, const KernelArgs<Cfg>& args,
                                              const BlockLayout<typename Cfg::acc>& layout,
                                              const RowGradient<typename Cfg::acc>& grad, int64_t anchor, bool valid,
                                              int64_t a0, int64_t k0, int64_t slice0, SliceAccumulator<Cfg>& out,
                                              typename Cfg::acc& grad_dot_logits, typename Cfg::acc& grad_sum) {
  using scalar_t = typename Cfg::scalar;
  using acc_t = typename Cfg::acc;
  constexpr acc_t prescale = gradient_prescale<std::is_same<scalar_t, __half>::value>();
  similarity_tile(smem, args.a, args.k, a0, k0, args.sub_dim);
  const RowThreads<Cfg> me;
  scalar_t* t = operand_t(smem) + me.row * Cfg::kLdT + me.first_col;
  const acc_t* dots = smem.scores + me.row * Cfg::kLdScores + me.first_col;
  const int64_t c0 = k0 + me.first_col;
  const int n = valid ? int(max(int64_t(0), min(int64_t(Cfg::kColsPerThread), args.k.count - c0))) : 0;
  if (n > 0)
    gradient_row_tile<acc_t>(layout, grad, anchor, c0, n, dots, args.k.inv, prescale, t, grad_dot_logits, grad_sum,
                             ToOperand<scalar_t>());
  for (int j = n; j < Cfg::kColsPerThread; ++j) t[j] = ToOperand<scalar_t>()(acc_t(0));
  load_tile<Cfg, Cfg::kRows, Cfg::kSlice, Cfg::kLdSlice, true>(smem.slice(), kKeyPass ? args.a : args.k,
                                                              kKeyPass ? a0 : k0, slice0, args.sub_dim);
  __syncthreads();
  out.template add<kKeyPass>(smem);
  __syncthreads();
}

template <class Cfg>
__device__ __forceinline__ RowGradient<typename Cfg::acc> row_gradient(const KernelArgs<Cfg>& args, int64_t anchor,
                                                                        bool valid, typename Cfg::acc inv_tau) {
  using acc_t = typename Cfg::acc;
  if (!valid) return {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  return {row_scale<acc_t>(args.a.inv, anchor, inv_tau), args.lse_in[anchor], args.alpha[anchor], args.beta[anchor]};
}

// dâ[anchor tile, slice] = Σ_key tiles T·K̂[:, slice] / (τ·prescale); slice 0 also stores Σ G·s, Σ G.
template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1) block_backward_anchor_kernel(const KernelArgs<Cfg> args) {
  using acc_t = typename Cfg::acc;
  __shared__ Smem<Cfg> smem;
  const BlockLayout<acc_t> layout = device_layout(args);
  const int64_t a0 = int64_t(blockIdx.x) * Cfg::kRows;
  const int64_t slice0 = int64_t(blockIdx.y) * Cfg::kSlice;
  const RowThreads<Cfg> me;
  const int64_t anchor = a0 + me.row;
  const bool valid = anchor < args.a.count;
  const acc_t inv_tau = acc_t(1) / *args.tau;
  const RowGradient<acc_t> grad = row_gradient(args, anchor, valid, inv_tau);
  acc_t grad_dot_logits = 0, grad_sum = 0;
  SliceAccumulator<Cfg> out;
  for (int64_t k0 = 0; k0 < args.k.count; k0 += Cfg::kRows)
    backward_tile<Cfg, false>(smem, args, layout, grad, anchor, valid, a0, k0, slice0, out, grad_dot_logits, grad_sum);
  constexpr acc_t prescale = gradient_prescale<std::is_same<typename Cfg::scalar, __half>::value>();
  out.store(smem, args.d_a, a0, args.a.count, slice0, args.sub_dim, inv_tau / prescale);
  grad_dot_logits = sum_row_threads<Cfg>(grad_dot_logits);
  grad_sum = sum_row_threads<Cfg>(grad_sum);
  if (blockIdx.y == 0 && valid && me.first_col == 0) {
    args.grad_sums[2 * anchor] = grad_dot_logits;
    args.grad_sums[2 * anchor + 1] = grad_sum;
  }
}

// dk̂[key tile, slice] = Σ_anchor tiles Tᵀ·Â[:, slice] / (τ·prescale): the CTA owns its keys' gradient.
template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1) block_backward_key_kernel(const KernelArgs<Cfg> args) {
  using acc_t = typename Cfg::acc;
  __shared__ Smem<Cfg> smem;
  const BlockLayout<acc_t> layout = device_layout(args);
  const int64_t k0 = int64_t(blockIdx.x) * Cfg::kRows;
  const int64_t slice0 = int64_t(blockIdx.y) * Cfg::kSlice;
  const int row = RowThreads<Cfg>().row;
  const acc_t inv_tau = acc_t(1) / *args.tau;
  acc_t unused_dot = 0, unused_sum = 0;  // Σ G·s comes from the anchor pass
  SliceAccumulator<Cfg> out;
  for (int64_t a0 = 0; a0 < args.a.count; a0 += Cfg::kRows) {
    const int64_t anchor = a0 + row;
    const bool valid = anchor < args.a.count;
    const RowGradient<acc_t> grad = row_gradient(args, anchor, valid, inv_tau);
    backward_tile<Cfg, true>(smem, args, layout, grad, anchor, valid, a0, k0, slice0, out, unused_dot, unused_sum);
  }
  constexpr acc_t prescale = gradient_prescale<std::is_same<typename Cfg::scalar, __half>::value>();
  out.store(smem, args.d_k, k0, args.k.count, slice0, args.sub_dim, inv_tau / prescale);
}

// In place: d[r, :] = dL/dz from dL/dẑ (normalization backward), one warp per row, fixed reduction tree.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    normalize_backward_kernel(const Rows<scalar_t, acc_t> rows, int64_t sub_dim, acc_t* d) {
  const int64_t r = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows.count) return;
  const scalar_t* z = rows.data + r * rows.stride_row;
  acc_t* dr = d + r * sub_dim;
  acc_t z_dot_d = 0;
  for (int64_t i = lane; i < sub_dim; i += 32) z_dot_d += to_acc<scalar_t, acc_t>(z[i * rows.stride_dim]) * dr[i];
#pragma unroll
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) z_dot_d += __shfl_xor_sync(0xffffffffu, z_dot_d, lane_mask);
  const acc_t inv = rows.inv[r];
  const acc_t coefficient = radial_coefficient<acc_t>(z_dot_d, inv);
  for (int64_t i = lane; i < sub_dim; i += 32)
    dr[i] = normalized_gradient<acc_t>(dr[i], to_acc<scalar_t, acc_t>(z[i * rows.stride_dim]), inv, coefficient);
}

// --- host launchers -----------------------------------------------------------------------------------------

template <class Cfg>
KernelArgs<Cfg> kernel_args(const BlockArgs& b) {
  using scalar_t = typename Cfg::scalar;
  using acc_t = typename Cfg::acc;
  KernelArgs<Cfg> k{};
  k.a = {static_cast<const scalar_t*>(b.a.data), b.a.count, b.a.stride_row, b.a.stride_dim,
         static_cast<const acc_t*>(b.a.inv)};
  k.k = {static_cast<const scalar_t*>(b.k.data), b.k.count, b.k.stride_row, b.k.stride_dim,
         static_cast<const acc_t*>(b.k.inv)};
  k.sub_dim = b.sub_dim;
  k.tau = static_cast<const acc_t*>(b.tau);
  k.bias = static_cast<const acc_t*>(b.layout.bias);
  const LayoutArg& l = b.layout;
  k.layout = {l.has_self, l.self_offset, l.positives, l.exclude_positives, l.epilogue, acc_t(0), l.pos_index,
              l.a_labels, l.k_labels, static_cast<const acc_t*>(l.mask), l.mask_rows, l.mask_cols};
  return k;
}

inline unsigned tiles(int64_t n, int tile) { return unsigned((n + tile - 1) / tile); }

template <class Cfg>
const char* forward(const BlockArgs& b, void* lse, void* pos_sum, void* pos_weight, cudaStream_t stream) {
  using acc_t = typename Cfg::acc;
  KernelArgs<Cfg> args = kernel_args<Cfg>(b);
  args.lse = static_cast<acc_t*>(lse);
  args.pos_sum = static_cast<acc_t*>(pos_sum);
  args.pos_weight = static_cast<acc_t*>(pos_weight);
  FASTCL_LAUNCH(block_forward_kernel<Cfg>, tiles(b.a.count, Cfg::kRows), stream, args);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

template <class Cfg>
const char* backward(const BlockArgs& b, const void* lse, const void* alpha, const void* beta, void* d_a, void* d_k,
                     void* grad_sums, cudaStream_t stream) {
  using scalar_t = typename Cfg::scalar;
  using acc_t = typename Cfg::acc;
  KernelArgs<Cfg> args = kernel_args<Cfg>(b);
  args.lse_in = static_cast<const acc_t*>(lse);
  args.alpha = static_cast<const acc_t*>(alpha);
  args.beta = static_cast<const acc_t*>(beta);
  args.d_a = static_cast<acc_t*>(d_a);
  args.d_k = static_cast<acc_t*>(d_k);
  args.grad_sums = static_cast<acc_t*>(grad_sums);
  const unsigned slices = tiles(b.sub_dim, Cfg::kSlice);
  FASTCL_LAUNCH(block_backward_anchor_kernel<Cfg>, dim3(tiles(b.a.count, Cfg::kRows), slices), stream, args);
  FASTCL_LAUNCH(block_backward_key_kernel<Cfg>, dim3(tiles(b.k.count, Cfg::kRows), slices), stream, args);
  constexpr int kRowsPerCta = kThreads / 32;
  auto normalize = normalize_backward_kernel<scalar_t, acc_t>;
  if (args.a.inv) FASTCL_LAUNCH(normalize, tiles(b.a.count, kRowsPerCta), stream, args.a, b.sub_dim, args.d_a);
  if (args.k.inv) FASTCL_LAUNCH(normalize, tiles(b.k.count, kRowsPerCta), stream, args.k, b.sub_dim, args.d_k);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

// launch.template run<Cfg>() with the tile configuration of the rows' dtype and math path.
template <typename Launch>
const char* with_config(const BlockArgs& b, const Launch& launch) {
  switch (b.dtype) {
    case ScalarType::kHalf: return launch.template run<Config<__half, kWmma16>>();
    case ScalarType::kBFloat16: return launch.template run<Config<__nv_bfloat16, kWmma16>>();
    case ScalarType::kFloat:
      switch (b.fp32_precision) {
        case Fp32Precision::kTf32x3: return launch.template run<Config<float, kWmmaTf32x3>>();
        case Fp32Precision::kTf32: return launch.template run<Config<float, kWmmaTf32>>();
        case Fp32Precision::kIeee: return launch.template run<Config<float, kFma>>();
      }
      return "fastcl: unsupported fp32 precision";
    case ScalarType::kDouble: return launch.template run<Config<double, kFma>>();
  }
  return "fastcl: unsupported dtype";
}

struct ForwardLaunch {
  const BlockArgs& b;
  void* lse;
  void* pos_sum;
  void* pos_weight;
  cudaStream_t stream;
  template <class Cfg>
  const char* run() const { return forward<Cfg>(b, lse, pos_sum, pos_weight, stream); }
};

struct BackwardLaunch {
  const BlockArgs& b;
  const void* lse;
  const void* alpha;
  const void* beta;
  void* d_a;
  void* d_k;
  void* grad_sums;
  cudaStream_t stream;
  template <class Cfg>
  const char* run() const { return backward<Cfg>(b, lse, alpha, beta, d_a, d_k, grad_sums, stream); }
};

}  // namespace

const char* launch_block_forward(const BlockArgs& b, void* lse, void* pos_sum, void* pos_weight, void* stream) {
  if (b.a.count == 0) return nullptr;
  return with_config(b, ForwardLaunch{b, lse, pos_sum, pos_weight, static_cast<cudaStream_t>(stream)});
}

// Callers pass zero-filled d_a / d_k: an empty key block leaves them untouched.
const char* launch_block_backward(const BlockArgs& b, const void* lse, const void* alpha, const void* beta, void* d_a,
                                  void* d_k, void* grad_sums, void* stream) {
  if (b.a.count == 0 || b.k.count == 0) return nullptr;
  return with_config(b, BackwardLaunch{b, lse, alpha, beta, d_a, d_k, grad_sums, static_cast<cudaStream_t>(stream)});
}

}  // namespace fastcl
