// Host-side interface between the torch binding (block_ops.cpp) and the kernels (block_kernels.cu): plain
// structs of pointers and strides, so the kernels compile without torch headers (make cuda-check).
#pragma once

#include <cstdint>

namespace fastcl {

enum class ScalarType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// How float32 rows multiply (PyTorch's fp32 matmul setting, read by the binding): three TF32 tensor-core
// products per product, the low-order terms of both operands included (about fp32 accuracy; the
// default), one TF32 product (the user allowed TF32), or exact FMA on the CUDA cores (asked for "ieee").
enum class Fp32Precision : int { kTf32x3 = 0, kTf32 = 1, kIeee = 2 };

// One side of the block: `count` rows read as data[row * stride_row + d * stride_dim] for d < sub_dim.
// `inv`: [count] inverse norms in the accumulation dtype, or nullptr (no normalization).
struct RowsArg {
  const void* data;
  int64_t count;
  int64_t stride_row;
  int64_t stride_dim;
  const void* inv;
};

// fastcl.contract.Layout as raw pointers (see BlockLayout in block_math.cuh). `mask` is contiguous, in the
// accumulation dtype; `bias` a device scalar in the accumulation dtype or nullptr.
struct LayoutArg {
  int has_self;
  int64_t self_offset;
  int positives;
  int exclude_positives;
  int epilogue;
  const void* bias;
  const int64_t* pos_index;
  const int64_t* a_labels;
  const int64_t* k_labels;
  const void* mask;
  int64_t mask_rows;
  int64_t mask_cols;
};

struct BlockArgs {
  ScalarType dtype;  // of a and k
  Fp32Precision fp32_precision;  // float32 rows only
  RowsArg a;
  RowsArg k;
  int64_t sub_dim;
  const void* tau;   // device scalar, accumulation dtype
  LayoutArg layout;
};

// Each returns nullptr on success, else the CUDA error string. Outputs are contiguous, accumulation dtype:
// forward lse / pos_sum / pos_weight [A]; backward d_a [A, sub_dim], d_k [K, sub_dim] and grad_sums [A, 2]
// (per anchor Σ_c G·s and Σ_c G; the caller sums them in a fixed order).
const char* launch_block_forward(const BlockArgs& args, void* lse, void* pos_sum, void* pos_weight, void* stream);
const char* launch_block_backward(const BlockArgs& args, const void* lse, const void* alpha, const void* beta, void* d_a,
                                  void* d_k, void* grad_sums, void* stream);

}  // namespace fastcl
