// Torch bindings of the block primitive: the ops fastcl_cuda::block_forward / block_backward (TORCH_LIBRARY,
// so autograd custom ops and torch.compile see them as ordinary operators) and a small pybind11 module,
// which is what `import fastcl._C` (ahead-of-time build) or torch.utils.cpp_extension.load (just in time)
// load. fastcl/cuda_backend.py is the Python side: it builds these arguments from a fastcl.contract.Layout.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <optional>
#include <tuple>

#include "block_launch.h"

namespace {

using at::Tensor;
using std::optional;

fastcl::ScalarType scalar_type(const Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kHalf: return fastcl::ScalarType::kHalf;
    case at::kBFloat16: return fastcl::ScalarType::kBFloat16;
    case at::kFloat: return fastcl::ScalarType::kFloat;
    case at::kDouble: return fastcl::ScalarType::kDouble;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected a float16, bfloat16, float32 or float64 tensor, got ",
                       x.scalar_type());
  }
}

at::ScalarType accumulation(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_vector(const optional<Tensor>& x, const char* name, int64_t length, at::ScalarType dtype,
                  const Tensor& like) {
  if (!x) return;
  TORCH_CHECK(x->dim() == 1 && x->size(0) == length, name, ": expected shape [", length, "], got ", x->sizes());
  TORCH_CHECK_TYPE(x->scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", x->scalar_type());
  TORCH_CHECK(x->device() == like.device(), name, ": expected device ", like.device(), ", got ", x->device());
  TORCH_CHECK(x->is_contiguous(), name, ": expected a contiguous tensor");
}

const void* data_or_null(const optional<Tensor>& x) { return x ? x->data_ptr() : nullptr; }

// float32 rows: 3xTF32 tensor cores unless PyTorch's fp32 matmul precision says otherwise — TF32 when the
// user allowed it (fp32_precision = "tf32", set_float32_matmul_precision("high"), allow_tf32), exact FMA when
// they asked for "ieee" (fp32_precision = "ieee" or set_float32_matmul_precision("highest")); the same rule as
// the Triton backend (kernels/_common.py, dot_precision). Torch before 2.9 has only allow_tf32, whose
// default cannot be told apart from a request for full precision: 3xTF32 unless TF32 is allowed.
fastcl::Fp32Precision fp32_precision() {
  auto& context = at::globalContext();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  at::Float32Precision setting = context.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
  if (setting == at::Float32Precision::NONE) {
    setting = context.float32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL);
  }
  if (setting == at::Float32Precision::TF32) return fastcl::Fp32Precision::kTf32;
  if (setting == at::Float32Precision::IEEE) return fastcl::Fp32Precision::kIeee;
  return fastcl::Fp32Precision::kTf32x3;
#else
  return context.allowTF32CuBLAS() ? fastcl::Fp32Precision::kTf32 : fastcl::Fp32Precision::kTf32x3;
#endif
}

fastcl::BlockArgs block_args(const Tensor& a, const optional<Tensor>& a_inv, const Tensor& k,
                             const optional<Tensor>& k_inv, const Tensor& tau, int64_t sub_dim, int64_t self_offset,
                             bool has_self, int64_t positives, bool exclude_positives, int64_t epilogue,
                             const optional<Tensor>& bias, const optional<Tensor>& pos_index,
                             const optional<Tensor>& a_labels, const optional<Tensor>& k_labels,
                             const optional<Tensor>& mask) {
  TORCH_CHECK(a.is_cuda(), "a: expected a CUDA tensor, got device ", a.device());
  TORCH_CHECK(k.device() == a.device(), "k: expected device ", a.device(), ", got ", k.device());
  TORCH_CHECK(a.dim() == 2 && k.dim() == 2, "a, k: expected 2-D tensors, got ", a.sizes(), " and ", k.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == k.scalar_type(), "k: expected dtype ", a.scalar_type(), ", got ", k.scalar_type());
  TORCH_CHECK(sub_dim >= 1 && sub_dim <= a.size(1) && sub_dim <= k.size(1), "sub_dim: expected 1 <= sub_dim <= ",
              std::min(a.size(1), k.size(1)), ", got ", sub_dim);
  const at::ScalarType acc = accumulation(a);
  check_vector(a_inv, "a_inv", a.size(0), acc, a);
  check_vector(k_inv, "k_inv", k.size(0), acc, a);
  TORCH_CHECK(tau.dim() == 0 && tau.scalar_type() == acc && tau.device() == a.device(), "tau: expected a 0-dim ", acc,
              " tensor on ", a.device(), ", got shape ", tau.sizes(), " ", tau.scalar_type(), " on ", tau.device());
  TORCH_CHECK(!bias || (bias->dim() == 0 && bias->scalar_type() == acc && bias->device() == a.device()),
              "bias: expected a 0-dim ", acc, " tensor on ", a.device());
  TORCH_CHECK(positives >= 0 && positives <= 3, "positives: expected 0..3, got ", positives);
  TORCH_CHECK(epilogue == 0 || epilogue == 1, "epilogue: expected 0 (softmax) or 1 (sigmoid), got ", epilogue);
  check_vector(pos_index, "pos_index", a.size(0), at::kLong, a);
  check_vector(a_labels, "a_labels", a.size(0), at::kLong, a);
  check_vector(k_labels, "k_labels", k.size(0), at::kLong, a);
  const char* needs[] = {nullptr, "pos_index", "a_labels and k_labels", "mask"};
  const bool given[] = {true, pos_index.has_value(), a_labels.has_value() && k_labels.has_value(), mask.has_value()};
  TORCH_CHECK(given[positives], needs[positives] ? needs[positives] : "", ": required by positives=", positives);
  if (mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) >= 1 && mask->size(1) >= 1 && mask->is_contiguous() &&
                    mask->scalar_type() == acc && mask->device() == a.device(),
                "mask: expected a contiguous non-empty 2-D ", acc, " tensor on ", a.device(), ", got ", mask->sizes(),
                " ", mask->scalar_type());
  }
  fastcl::BlockArgs args{};
  args.dtype = scalar_type(a, "a");
  args.fp32_precision = fp32_precision();
  args.a = {a.data_ptr(), a.size(0), a.stride(0), a.stride(1), data_or_null(a_inv)};
  args.k = {k.data_ptr(), k.size(0), k.stride(0), k.stride(1), data_or_null(k_inv)};
  args.sub_dim = sub_dim;
  args.tau = tau.data_ptr();
  args.layout = {has_self,
                 self_offset,
                 int(positives),
                 exclude_positives,
                 int(epilogue),
                 data_or_null(bias),
                 pos_index ? pos_index->data_ptr<int64_t>() : nullptr,
                 a_labels ? a_labels->data_ptr<int64_t>() : nullptr,
                 k_labels ? k_labels->data_ptr<int64_t>() : nullptr,
                 data_or_null(mask),
                 mask ? mask->size(0) : 1,
                 mask ? mask->size(1) : 1};
  return args;
}

std::tuple<Tensor, Tensor, Tensor> block_forward(const Tensor& a, const optional<Tensor>& a_inv, const Tensor& k,
                                                 const optional<Tensor>& k_inv, const Tensor& tau, int64_t sub_dim,
                                                 bool has_self, int64_t self_offset, int64_t positives,
                                                 bool exclude_positives, int64_t epilogue, const optional<Tensor>& bias,
                                                 const optional<Tensor>& pos_index, const optional<Tensor>& a_labels,
                                                 const optional<Tensor>& k_labels, const optional<Tensor>& mask) {
  const fastcl::BlockArgs args = block_args(a, a_inv, k, k_inv, tau, sub_dim, self_offset, has_self, positives,
                                            exclude_positives, epilogue, bias, pos_index, a_labels, k_labels, mask);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto options = a.options().dtype(accumulation(a));
  Tensor lse = at::empty({a.size(0)}, options), pos_sum = at::empty({a.size(0)}, options);
  Tensor pos_weight = at::empty({a.size(0)}, options);
  const char* error = fastcl::launch_block_forward(args, lse.data_ptr(), pos_sum.data_ptr(), pos_weight.data_ptr(),
                                                   c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "fastcl_cuda::block_forward: kernel launch failed: ", error);
  return {lse, pos_sum, pos_weight};
}

std::tuple<Tensor, Tensor, Tensor> block_backward(const Tensor& a, const optional<Tensor>& a_inv, const Tensor& k,
                                                  const optional<Tensor>& k_inv, const Tensor& tau, int64_t sub_dim,
                                                  bool has_self, int64_t self_offset, int64_t positives,
                                                  bool exclude_positives, int64_t epilogue, const optional<Tensor>& bias,
                                                  const optional<Tensor>& pos_index, const optional<Tensor>& a_labels,
                                                  const optional<Tensor>& k_labels, const optional<Tensor>& mask,
                                                  const Tensor& lse, const Tensor& alpha, const Tensor& beta) {
  const fastcl::BlockArgs args = block_args(a, a_inv, k, k_inv, tau, sub_dim, self_offset, has_self, positives,
                                            exclude_positives, epilogue, bias, pos_index, a_labels, k_labels, mask);
  const at::ScalarType acc = accumulation(a);
  check_vector(lse, "lse", a.size(0), acc, a);
  check_vector(alpha, "alpha", a.size(0), acc, a);
  check_vector(beta, "beta", a.size(0), acc, a);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto options = a.options().dtype(acc);
  Tensor d_a = at::zeros({a.size(0), sub_dim}, options), d_k = at::zeros({k.size(0), sub_dim}, options);
  Tensor grad_sums = at::zeros({a.size(0), 2}, options);
  const char* error = fastcl::launch_block_backward(args, lse.data_ptr(), alpha.data_ptr(), beta.data_ptr(),
                                                    d_a.data_ptr(), d_k.data_ptr(), grad_sums.data_ptr(),
                                                    c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "fastcl_cuda::block_backward: kernel launch failed: ", error);
  return {d_a, d_k, grad_sums};
}

}  // namespace

#define FASTCL_BLOCK_ARGS                                                                                          \
  "Tensor a, Tensor? a_inv, Tensor k, Tensor? k_inv, Tensor tau, int sub_dim, bool has_self, int self_offset, "   \
  "int positives, bool exclude_positives, int epilogue, Tensor? bias, Tensor? pos_index, Tensor? a_labels, "      \
  "Tensor? k_labels, Tensor? mask"

TORCH_LIBRARY(fastcl_cuda, m) {
  m.def("block_forward(" FASTCL_BLOCK_ARGS ") -> (Tensor lse, Tensor pos_sum, Tensor pos_weight)");
  m.def("block_backward(" FASTCL_BLOCK_ARGS
        ", Tensor lse, Tensor alpha, Tensor beta) -> (Tensor d_a, Tensor d_k, Tensor grad_sums)");
}

TORCH_LIBRARY_IMPL(fastcl_cuda, CUDA, m) {
  m.impl("block_forward", &block_forward);
  m.impl("block_backward", &block_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcl's CUDA block primitive; the ops are torch.ops.fastcl_cuda.block_forward / block_backward";
}
