// A host build of the block primitive over the same per-tile code the CUDA kernels run (block_math.cuh):
// the kernels' tiling (key tiles split between the threads of a row, merged in the shuffle order) with
// the GEMMs as plain loops. tests/test_csrc_host.py compiles it with g++ and checks it against float64
// formulas; nothing in the package loads it.
//
// Rows arrive in the accumulation dtype; 16-bit runs are emulated by passing rows already rounded to the
// 16-bit dtype (their products are exact in fp32, as in the tensor cores) and `operand` = 1 (bfloat16)
// or 2 (float16), which rounds the second GEMM's operands (T = G·prescale and the scaled rows) the way
// the kernels' conversions do.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "block_math.cuh"

namespace fastcl {
namespace {

enum Operand : int { kExact = 0, kBFloat16 = 1, kFloat16 = 2 };

float round_bfloat16(float x) {  // round to nearest even, as __float2bfloat16_rn (finite inputs)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

template <typename acc_t>
struct RoundOperand {
  int mode;
  acc_t operator()(acc_t x) const {
    if (mode == kBFloat16) return round_bfloat16(float(x));
    if (mode == kFloat16) return float(static_cast<_Float16>(float(x)));
    return x;
  }
};

template <typename acc_t>
struct HostRows {
  const acc_t* data;
  int64_t count;
  int64_t stride_row;
  int64_t stride_dim;
  const acc_t* inv;  // nullptr: no normalization

  acc_t at(int64_t row, int64_t d) const { return data[row * stride_row + d * stride_dim]; }
};

template <typename acc_t>
acc_t dot(const HostRows<acc_t>& a, int64_t i, const HostRows<acc_t>& k, int64_t j, int64_t sub_dim) {
  acc_t sum = 0;
  for (int64_t d = 0; d < sub_dim; ++d) sum = std::fma(a.at(i, d), k.at(j, d), sum);
  return sum;
}

// Raw dot products of anchor a against keys k0 .. k0+n-1.
template <typename acc_t>
std::vector<acc_t> dot_row(const HostRows<acc_t>& a, int64_t anchor, const HostRows<acc_t>& k, int64_t k0, int n,
                           int64_t sub_dim) {
  std::vector<acc_t> dots(n);
  for (int j = 0; j < n; ++j) dots[j] = dot(a, anchor, k, k0 + j, sub_dim);
  return dots;
}

template <typename acc_t>
void forward(const HostRows<acc_t>& a, const HostRows<acc_t>& k, int64_t sub_dim, acc_t tau,
             const BlockLayout<acc_t>& layout, int tile, int threads_per_row, acc_t* lse, acc_t* pos_sum,
             acc_t* pos_weight) {
  const int cols_per_thread = tile / threads_per_row;
  for (int64_t anchor = 0; anchor < a.count; ++anchor) {
    const acc_t scale = row_scale<acc_t>(a.inv, anchor, acc_t(1) / tau);
    std::vector<RowStats<acc_t>> parts(threads_per_row, RowStats<acc_t>::empty());
    for (int64_t k0 = 0; k0 < k.count; k0 += tile) {
      for (int p = 0; p < threads_per_row; ++p) {
        const int64_t c0 = k0 + p * cols_per_thread;
        const int n = int(std::min<int64_t>(cols_per_thread, k.count - c0));
        if (n <= 0) continue;
        const std::vector<acc_t> dots = dot_row(a, anchor, k, c0, n, sub_dim);
        accumulate_row_tile<acc_t>(parts[p], layout, anchor, c0, n, dots.data(), 1, scale, k.inv);
      }
    }
    for (int lane_mask = 1; lane_mask < threads_per_row; lane_mask <<= 1) {  // the kernels' shuffle tree
      std::vector<RowStats<acc_t>> merged = parts;
      for (int p = 0; p < threads_per_row; ++p) merged[p].merge(parts[p ^ lane_mask], layout.epilogue);
      parts = merged;
    }
    lse[anchor] = parts[0].finish(layout.epilogue);
    pos_sum[anchor] = parts[0].pos_sum;
    pos_weight[anchor] = parts[0].pos_weight;
  }
}

template <typename acc_t>
void normalize_backward(const HostRows<acc_t>& rows, int64_t sub_dim, acc_t* d) {
  if (!rows.inv) return;
  for (int64_t r = 0; r < rows.count; ++r) {
    acc_t z_dot_d = 0;
    for (int64_t i = 0; i < sub_dim; ++i) z_dot_d += rows.at(r, i) * d[r * sub_dim + i];
    const acc_t coefficient = radial_coefficient<acc_t>(z_dot_d, rows.inv[r]);
    for (int64_t i = 0; i < sub_dim; ++i)
      d[r * sub_dim + i] = normalized_gradient<acc_t>(d[r * sub_dim + i], rows.at(r, i), rows.inv[r], coefficient);
  }
}

template <typename acc_t>
void backward(const HostRows<acc_t>& a, const HostRows<acc_t>& k, int64_t sub_dim, acc_t tau,
              const BlockLayout<acc_t>& layout, const acc_t* lse, const acc_t* alpha, const acc_t* beta, int operand,
              acc_t* d_a, acc_t* d_k, acc_t* grad_sums) {
  const RoundOperand<acc_t> to_operand{operand};
  const acc_t prescale = operand == kFloat16 ? gradient_prescale<true>() : gradient_prescale<false>();
  const acc_t inv_tau = acc_t(1) / tau;
  std::fill(d_a, d_a + a.count * sub_dim, acc_t(0));
  std::fill(d_k, d_k + k.count * sub_dim, acc_t(0));
  // The second GEMMs' operands: rows scaled by their inverse norms, rounded like the kernels' tiles.
  auto scaled = [&](const HostRows<acc_t>& rows, int64_t r, int64_t d) {
    const acc_t x = rows.at(r, d);
    return rows.inv ? to_operand(x * rows.inv[r]) : x;
  };
  for (int64_t anchor = 0; anchor < a.count; ++anchor) {
    const RowGradient<acc_t> grad{row_scale<acc_t>(a.inv, anchor, inv_tau), lse[anchor], alpha[anchor], beta[anchor]};
    const std::vector<acc_t> dots = dot_row(a, anchor, k, 0, int(k.count), sub_dim);
    std::vector<acc_t> t(k.count);
    acc_t grad_dot_logits = 0, grad_sum = 0;
    gradient_row_tile<acc_t>(layout, grad, anchor, 0, int(k.count), dots.data(), 1, k.inv, prescale, t.data(),
                             grad_dot_logits, grad_sum, to_operand);
    grad_sums[2 * anchor] = grad_dot_logits;
    grad_sums[2 * anchor + 1] = grad_sum;
    for (int64_t c = 0; c < k.count; ++c) {
      if (t[c] == acc_t(0)) continue;
      for (int64_t d = 0; d < sub_dim; ++d) {
        d_a[anchor * sub_dim + d] += t[c] * scaled(k, c, d);
        d_k[c * sub_dim + d] += t[c] * scaled(a, anchor, d);
      }
    }
  }
  for (int64_t i = 0; i < a.count * sub_dim; ++i) d_a[i] *= inv_tau / prescale;
  for (int64_t i = 0; i < k.count * sub_dim; ++i) d_k[i] *= inv_tau / prescale;
  normalize_backward(a, sub_dim, d_a);
  normalize_backward(k, sub_dim, d_k);
}

}  // namespace
}  // namespace fastcl

// C entry points for ctypes. `rows` = {a_count, a_stride_row, a_stride_dim, k_count, k_stride_row,
// k_stride_dim, sub_dim}; `layout_ints` = {has_self, self_offset, positives, exclude_positives, epilogue,
// mask_rows, mask_cols}; `scalars` = {tau, bias}.
namespace {

template <typename acc_t>
struct Block {
  fastcl::HostRows<acc_t> a, k;
  int64_t sub_dim;
  fastcl::BlockLayout<acc_t> layout;
  acc_t tau;
};

template <typename acc_t>
Block<acc_t> unpack(const acc_t* a, const acc_t* a_inv, const acc_t* k, const acc_t* k_inv, const int64_t* rows,
                    const int64_t* layout_ints, const acc_t* scalars, const int64_t* pos_index, const int64_t* a_labels,
                    const int64_t* k_labels, const acc_t* mask) {
  Block<acc_t> b;
  b.a = {a, rows[0], rows[1], rows[2], a_inv};
  b.k = {k, rows[3], rows[4], rows[5], k_inv};
  b.sub_dim = rows[6];
  b.layout = {int(layout_ints[0]), layout_ints[1], int(layout_ints[2]), int(layout_ints[3]), int(layout_ints[4]),
              scalars[1], pos_index, a_labels, k_labels, mask, layout_ints[5], layout_ints[6]};
  b.tau = scalars[0];
  return b;
}

}  // namespace

#define FASTCL_HOST_ENTRY_POINTS(acc_t, suffix)                                                                      \
  extern "C" void fastcl_block_forward_##suffix(                                                                   \
      const acc_t* a, const acc_t* a_inv, const acc_t* k, const acc_t* k_inv, const int64_t* rows,                 \
      const int64_t* layout_ints, const acc_t* scalars, const int64_t* pos_index, const int64_t* a_labels,         \
      const int64_t* k_labels, const acc_t* mask, int tile, int threads_per_row, acc_t* lse, acc_t* pos_sum,         \
      acc_t* pos_weight) {                                                                                         \
    const Block<acc_t> b = unpack(a, a_inv, k, k_inv, rows, layout_ints, scalars, pos_index, a_labels, k_labels, mask); \
    fastcl::forward(b.a, b.k, b.sub_dim, b.tau, b.layout, tile, threads_per_row, lse, pos_sum, pos_weight);         \
  }                                                                                                                \
  extern "C" void fastcl_block_backward_##suffix(                                                                  \
      const acc_t* a, const acc_t* a_inv, const acc_t* k, const acc_t* k_inv, const int64_t* rows,                 \
      const int64_t* layout_ints, const acc_t* scalars, const int64_t* pos_index, const int64_t* a_labels,         \
      const int64_t* k_labels, const acc_t* mask, const acc_t* lse, const acc_t* alpha, const acc_t* beta,         \
      int operand, acc_t* d_a, acc_t* d_k, acc_t* grad_sums) {                                                     \
    const Block<acc_t> b = unpack(a, a_inv, k, k_inv, rows, layout_ints, scalars, pos_index, a_labels, k_labels, mask); \
    fastcl::backward(b.a, b.k, b.sub_dim, b.tau, b.layout, lse, alpha, beta, operand, d_a, d_k, grad_sums);        \
  }

FASTCL_HOST_ENTRY_POINTS(float, float32)
FASTCL_HOST_ENTRY_POINTS(double, float64)
