// The block primitive's per-tile arithmetic, called by the CUDA kernels (block_kernels.cu): which entries
// are positives / excluded, the logit of one entry, the online log-sum-exp (or sigmoid) statistics of one
// anchor row over one key tile, the gradient tile G and its rounding for the second GEMM, and the fused
// normalization's backward.
//
// Plain C++ marked __host__ __device__ under nvcc, with no CUDA or torch headers, so the same code also
// builds for the host (kernel_emulation.cpp, the CPU tests). docs/block-engine.md is the contract.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FASTCL_HD __host__ __device__ __forceinline__
#else
#define FASTCL_HD inline
#endif

namespace fastcl {

// The float overloads for float accumulators (the C names would compute in double on the host).
using std::exp;
using std::fabs;
using std::log;
using std::log1p;

// As torch.nn.functional.normalize: ẑ = z / max(‖z‖, kNormEps). An inverse norm at (or above) 1/kNormEps
// means the norm was clamped: the backward is then r·dẑ only.
constexpr double kNormEps = 1e-12;

enum Positives : int { kPositivesNone = 0, kPositivesIndex = 1, kPositivesLabels = 2, kPositivesMask = 3 };
enum Epilogue : int { kSoftmax = 0, kSigmoid = 1 };

template <typename acc_t>
FASTCL_HD acc_t negative_infinity() {
  return -static_cast<acc_t>(INFINITY);
}

// Which entries of an anchors × keys block are positives and which are left out (fastcl.contract.Layout
// with its tensors as raw pointers). Indices a, c are block-local.
template <typename acc_t>
struct BlockLayout {
  int has_self;            // anchor a is key a + self_offset
  int64_t self_offset;
  int positives;           // Positives
  int exclude_positives;   // DCL: entries with P != 0 also leave the denominator
  int epilogue;            // Epilogue
  acc_t bias;              // sigmoid epilogue: logit bias b
  const int64_t* pos_index;  // [A], -1 = no positive in this block
  const int64_t* a_labels;   // [A]
  const int64_t* k_labels;   // [K]
  const acc_t* mask;         // [mask_rows, mask_cols], contiguous
  int64_t mask_rows;
  int64_t mask_cols;

  FASTCL_HD bool is_self(int64_t a, int64_t c) const { return has_self && c == a + self_offset; }

  // P_ac; 0 on the self entry.
  FASTCL_HD acc_t positive_weight(int64_t a, int64_t c) const {
    if (is_self(a, c)) return acc_t(0);
    switch (positives) {
      case kPositivesIndex: return pos_index[a] == c ? acc_t(1) : acc_t(0);
      case kPositivesLabels: return a_labels[a] == k_labels[c] ? acc_t(1) : acc_t(0);
      case kPositivesMask: return mask[(a % mask_rows) * mask_cols + (c % mask_cols)];
      default: return acc_t(0);
    }
  }

  // Excluded entries take no part in the denominator statistic (nor in G's first term).
  FASTCL_HD bool is_excluded(int64_t a, int64_t c, acc_t weight) const {
    return is_self(a, c) || (exclude_positives && weight != acc_t(0));
  }
};

// s_ac from the accumulated dot product: (a·k) · (a_inv·(1/τ)) · k_inv. row_scale = a_inv/τ is formed once
// per anchor, so the forward and the backward multiply the same numbers in the same order (same bits).
template <typename acc_t>
FASTCL_HD acc_t logit(acc_t dot, acc_t row_scale, const acc_t* k_inv, int64_t c) {
  return dot * row_scale * (k_inv ? k_inv[c] : acc_t(1));
}

template <typename acc_t>
FASTCL_HD acc_t row_scale(const acc_t* a_inv, int64_t a, acc_t inv_tau) {
  return (a_inv ? a_inv[a] : acc_t(1)) * inv_tau;
}

template <typename acc_t>
FASTCL_HD acc_t softplus(acc_t x) {
  return (x > acc_t(0) ? x : acc_t(0)) + log1p(exp(-fabs(x)));
}

template <typename acc_t>
FASTCL_HD acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp(-x));
}

// One anchor's forward statistics so far: running max and scaled sum of exp (softmax epilogue; the
// sigmoid epilogue sums softplus in `sum` and leaves max at -inf), and the positive sums.
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t sum;
  acc_t pos_sum;
  acc_t pos_weight;

  FASTCL_HD static RowStats empty() { return {negative_infinity<acc_t>(), acc_t(0), acc_t(0), acc_t(0)}; }

  // Combines two partial statistics of the same anchor (disjoint key sets). Safe when either side has
  // seen nothing (max = -inf); symmetric, so two threads merging each other's values agree bit for bit.
  FASTCL_HD void merge(const RowStats& other, int epilogue) {
    pos_sum += other.pos_sum;
    pos_weight += other.pos_weight;
    if (epilogue == kSigmoid) {
      sum += other.sum;
      return;
    }
    const acc_t new_max = max > other.max ? max : other.max;
    if (new_max == negative_infinity<acc_t>()) return;
    sum = sum * exp(max - new_max) + other.sum * exp(other.max - new_max);
    max = new_max;
  }

  // The block's statistic: log Σ exp (−inf when every entry was excluded), or Σ softplus.
  FASTCL_HD acc_t finish(int epilogue) const {
    if (epilogue == kSigmoid) return sum;
    return sum > acc_t(0) ? max + log(sum) : negative_infinity<acc_t>();
  }
};

// Folds entries c0 .. c0+n-1 of anchor a (their raw dot products dots[0 .. n-1]) into the anchor's
// statistics: one tile max, then one rescale of the running sum (online log-sum-exp).
template <typename acc_t>
FASTCL_HD void accumulate_row_tile(RowStats<acc_t>& stats, const BlockLayout<acc_t>& layout, int64_t a, int64_t c0,
                                   int n, const acc_t* dots, acc_t scale, const acc_t* k_inv) {
  RowStats<acc_t> tile = RowStats<acc_t>::empty();
  for (int j = 0; j < n; ++j) {
    const int64_t c = c0 + j;
    const acc_t s = logit<acc_t>(dots[j], scale, k_inv, c);
    const acc_t weight = layout.positive_weight(a, c);
    tile.pos_sum += weight * s;
    tile.pos_weight += weight;
    if (layout.is_excluded(a, c, weight)) continue;
    if (layout.epilogue == kSigmoid) {
      tile.sum += softplus(s + layout.bias);
    } else if (s > tile.max) {
      tile.max = s;
    }
  }
  if (layout.epilogue == kSoftmax && tile.max != negative_infinity<acc_t>()) {
    for (int j = 0; j < n; ++j) {
      const int64_t c = c0 + j;
      const acc_t weight = layout.positive_weight(a, c);
      if (layout.is_excluded(a, c, weight)) continue;
      tile.sum += exp(logit<acc_t>(dots[j], scale, k_inv, c) - tile.max);
    }
  }
  stats.merge(tile, layout.epilogue);
}

// Per-anchor inputs of the backward: the global statistic and the coefficients of G.
template <typename acc_t>
struct RowGradient {
  acc_t scale;  // a_inv / τ
  acc_t lse;
  acc_t alpha;
  acc_t beta;
};

// G_ac = alpha·exp(s − lse) − beta·P (softmax) or alpha·σ(s + b) − beta·P (sigmoid); the first term is 0
// on excluded entries, G = 0 on the self entry. Returns G and sets s (for Σ G·s).
template <typename acc_t>
FASTCL_HD acc_t gradient_entry(const BlockLayout<acc_t>& layout, const RowGradient<acc_t>& row, int64_t a, int64_t c,
                               acc_t dot, const acc_t* k_inv, acc_t& s) {
  s = logit<acc_t>(dot, row.scale, k_inv, c);
  const acc_t weight = layout.positive_weight(a, c);
  acc_t g = -row.beta * weight;
  if (!layout.is_excluded(a, c, weight)) {
    g += row.alpha * (layout.epilogue == kSigmoid ? sigmoid(s + layout.bias) : exp(s - row.lse));
  }
  return g;
}

// Gradient tile entries c0 .. c0+n-1 of anchor a: writes T = round(G · prescale) (the operand of the
// second GEMM, in the rows' dtype through `to_operand`) and adds Σ G·s and Σ G to the running sums.
template <typename acc_t, typename out_t, typename ToOperand>
FASTCL_HD void gradient_row_tile(const BlockLayout<acc_t>& layout, const RowGradient<acc_t>& row, int64_t a,
                                 int64_t c0, int n, const acc_t* dots, const acc_t* k_inv, acc_t prescale, out_t* t,
                                 acc_t& grad_dot_logits, acc_t& grad_sum, ToOperand to_operand) {
  for (int j = 0; j < n; ++j) {
    acc_t s;
    const acc_t g = gradient_entry<acc_t>(layout, row, a, c0 + j, dots[j], k_inv, s);
    t[j] = to_operand(g * prescale);
    grad_dot_logits += g * s;
    grad_sum += g;
  }
}

// The second GEMM's operand in float16 is G·4096: softmax weights ~1/M stay out of float16's subnormal
// range (|G| ≤ 2 there, so no overflow). A power of two: dividing it out again is exact.
template <bool kIsHalf>
FASTCL_HD constexpr float gradient_prescale() {
  return kIsHalf ? 4096.0f : 1.0f;
}

// dL/dz from dL/dẑ for ẑ = z·r (F.normalize's backward): r·(dẑ − ẑ⟨ẑ, dẑ⟩), written with the raw row as
// r·dẑ − c·z with c = r³·⟨z, dẑ⟩; c is 0 where the norm was clamped (there ẑ = z·r is linear in z).
template <typename acc_t>
FASTCL_HD acc_t radial_coefficient(acc_t z_dot_dhat, acc_t inv) {
  const bool clamped = inv >= acc_t(1.0 / kNormEps);
  return clamped ? acc_t(0) : z_dot_dhat * inv * inv * inv;
}

template <typename acc_t>
FASTCL_HD acc_t normalized_gradient(acc_t d_hat, acc_t z, acc_t inv, acc_t radial_coefficient) {
  return d_hat * inv - radial_coefficient * z;
}

}  // namespace fastcl
