// The CUDA kernels of block_kernels.cu compiled for the host: a launch runs as kThreads std::threads that
// execute its CTAs one after another (so a `__shared__` variable, here a function-local static, is the
// running CTA's shared memory), with __syncthreads as a barrier and warp shuffles through a per-warp
// exchange. Every math path builds: the WMMA API is emulated below with each lane holding the whole
// 16×16 tile (load/store follow the documented row/column-major addressing, mma_sync sums the exact
// 16-bit or TF32 products in fp32), and float16 / bfloat16 are stored as their IEEE bits with
// round-to-nearest-even conversions. What the emulation cannot show: the hardware's accumulation order
// inside an MMA, timing, and anything about occupancy or memory coalescing.
// tests/test_csrc_host.py compiles it with g++ (no CUDA toolkit needed) and runs the kernels, their grid
// and their launchers on the CPU; nothing in the package loads it.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define FASTCL_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
using std::fma;
using std::max;
using std::min;

thread_local dim3 threadIdx, blockIdx;

namespace emulation {

// The running CTA's barrier and, per warp, a barrier and 32 exchange slots for shuffles.
std::unique_ptr<std::barrier<>> block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
std::vector<double> exchange;

}  // namespace emulation

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }

// --- 16-bit types (cuda_fp16.h / cuda_bf16.h) ---------------------------------------------------------------

struct __half {
  _Float16 value;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half x) { return float(x.value); }
inline __half __float2half_rn(float x) { return {static_cast<_Float16>(x)}; }  // round to nearest even
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t bits = uint32_t(x.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {  // round to nearest even (finite inputs)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return {uint16_t(bits >> 16)};
}

// --- WMMA (mma.h) -------------------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};
// Every lane holds the whole tile, in row-major order, as floats (16-bit values widen exactly; TF32
// values are rounded by the kernels through __float_to_tf32 on x[], as on the GPU).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using layout = Layout;
  static constexpr int rows = Shape<Use, M, N, K>::rows, cols = Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Fragment, typename T>
void load_matrix_sync(Fragment& f, const T* pointer, unsigned ldm) {
  constexpr bool column_major = std::is_same<typename Fragment::layout, col_major>::value;
  for (int r = 0; r < Fragment::rows; ++r)
    for (int c = 0; c < Fragment::cols; ++c)
      f.x[r * Fragment::cols + c] = to_float(pointer[column_major ? c * ldm + r : r * ldm + c]);
}

template <typename Fragment>
void fill_fragment(Fragment& f, float value) {
  for (auto& x : f.x) x = value;
}

template <typename D, typename A, typename B, typename C>
void mma_sync(D& d, const A& a, const B& b, const C& c) {
  float out[D::num_elements];
  for (int i = 0; i < A::rows; ++i)
    for (int j = 0; j < B::cols; ++j) {
      float sum = c.x[i * C::cols + j];
      for (int k = 0; k < A::cols; ++k) sum = fma(a.x[i * A::cols + k], b.x[k * B::cols + j], sum);
      out[i * D::cols + j] = sum;
    }
  std::copy(out, out + D::num_elements, d.x);
}

// One lane writes (all lanes hold the same tile); readers wait on a __syncthreads, as on the GPU.
template <typename Fragment>
void store_matrix_sync(float* pointer, const Fragment& f, unsigned ldm, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < Fragment::rows; ++r)
    for (int c = 0; c < Fragment::cols; ++c)
      pointer[layout == mem_col_major ? c * ldm + r : r * ldm + c] = f.x[r * Fragment::cols + c];
}

inline float __float_to_tf32(float x) {  // keep 10 mantissa bits, round to nearest (ties away from zero)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = (bits + 0x1000u) & ~0x1fffu;
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

}  // namespace wmma
}  // namespace nvcuda

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(double), "one exchange slot per thread");
  const unsigned thread = threadIdx.x, warp = thread / 32;
  std::memcpy(&emulation::exchange[thread], &value, sizeof(T));
  emulation::warp_barriers[warp]->arrive_and_wait();  // every lane has published its value
  T other;
  std::memcpy(&other, &emulation::exchange[warp * 32 + ((thread % 32) ^ unsigned(lane_mask))], sizeof(T));
  emulation::warp_barriers[warp]->arrive_and_wait();  // every lane has read before a slot is reused
  return other;
}

template <typename Kernel, typename... Args>
void emulate_launch(Kernel kernel, dim3 grid, unsigned threads, Args... args) {
  emulation::block_barrier = std::make_unique<std::barrier<>>(threads);
  emulation::warp_barriers.clear();
  for (unsigned w = 0; w < threads / 32; ++w) emulation::warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  emulation::exchange.assign(threads, 0.0);
  std::vector<std::thread> cta;
  for (unsigned t = 0; t < threads; ++t) {
    cta.emplace_back([=] {
      threadIdx = dim3(t);
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {  // CTAs one after another: the statics are their smem
          blockIdx = dim3(bx, by);
          kernel(args...);
          emulation::block_barrier->arrive_and_wait();
        }
      }
    });
  }
  for (std::thread& thread : cta) thread.join();
}

#define FASTCL_LAUNCH(kernel, grid, stream, ...) \
  ((void)(stream), emulate_launch(kernel, dim3(grid), kThreads, __VA_ARGS__))

#include "block_kernels.cu"

// C entry points for the tests (ctypes), one per rows dtype / math path. `rows` = {a_count, a_stride_row,
// a_stride_dim, k_count, k_stride_row, k_stride_dim, sub_dim}; `layout_ints` = {has_self, self_offset,
// positives, exclude_positives, epilogue, mask_rows, mask_cols}; `scalars` = {tau, bias}.
namespace {

template <typename row_t, typename acc_t>
fastcl::BlockArgs block_args(fastcl::ScalarType dtype, fastcl::Fp32Precision precision, const row_t* a,
                             const acc_t* a_inv,
                             const row_t* k, const acc_t* k_inv, const int64_t* rows, const int64_t* layout_ints,
                             const acc_t* scalars, const int64_t* pos_index, const int64_t* a_labels,
                             const int64_t* k_labels, const acc_t* mask) {
  fastcl::BlockArgs b{};
  b.dtype = dtype;
  b.fp32_precision = precision;
  b.a = {a, rows[0], rows[1], rows[2], a_inv};
  b.k = {k, rows[3], rows[4], rows[5], k_inv};
  b.sub_dim = rows[6];
  b.tau = &scalars[0];
  b.layout = {int(layout_ints[0]), layout_ints[1], int(layout_ints[2]), int(layout_ints[3]), int(layout_ints[4]),
              &scalars[1], pos_index, a_labels, k_labels, mask, layout_ints[5], layout_ints[6]};
  return b;
}

}  // namespace

#define FASTCL_EMULATED_ENTRY_POINTS(row_t, acc_t, suffix, dtype, precision)                                      \
  extern "C" const char* fastcl_block_forward_##suffix(                                                           \
      const row_t* a, const acc_t* a_inv, const row_t* k, const acc_t* k_inv, const int64_t* rows,               \
      const int64_t* layout_ints, const acc_t* scalars, const int64_t* pos_index, const int64_t* a_labels,        \
      const int64_t* k_labels, const acc_t* mask, acc_t* lse, acc_t* pos_sum, acc_t* pos_weight) {                \
    const fastcl::BlockArgs b = block_args(dtype, precision, a, a_inv,   k, k_inv, rows, layout_ints, scalars,     \
                                           pos_index, a_labels, k_labels, mask);                                  \
    return fastcl::launch_block_forward(b, lse, pos_sum, pos_weight, nullptr);                                    \
  }                                                                                                               \
  extern "C" const char* fastcl_block_backward_##suffix(                                                          \
      const row_t* a, const acc_t* a_inv, const row_t* k, const acc_t* k_inv, const int64_t* rows,               \
      const int64_t* layout_ints, const acc_t* scalars, const int64_t* pos_index, const int64_t* a_labels,        \
      const int64_t* k_labels, const acc_t* mask, const acc_t* lse, const acc_t* alpha, const acc_t* beta,        \
      acc_t* d_a, acc_t* d_k, acc_t* grad_sums) {                                                                 \
    const fastcl::BlockArgs b = block_args(dtype, precision, a, a_inv,   k, k_inv, rows, layout_ints, scalars,     \
                                           pos_index, a_labels, k_labels, mask);                                  \
    std::fill(d_a, d_a + rows[0] * rows[6], acc_t(0)); /* the op zero-fills its outputs too */                  \
    std::fill(d_k, d_k + rows[3] * rows[6], acc_t(0));                                                            \
    std::fill(grad_sums, grad_sums + 2 * rows[0], acc_t(0));                                                      \
    return fastcl::launch_block_backward(b, lse, alpha, beta, d_a, d_k, grad_sums, nullptr);                      \
  }

constexpr auto kIeee = fastcl::Fp32Precision::kIeee;  // the precision argument matters for float32 rows only
FASTCL_EMULATED_ENTRY_POINTS(float, float, float32, fastcl::ScalarType::kFloat, kIeee)
FASTCL_EMULATED_ENTRY_POINTS(double, double, float64, fastcl::ScalarType::kDouble, kIeee)
FASTCL_EMULATED_ENTRY_POINTS(float, float, float32_tf32, fastcl::ScalarType::kFloat, fastcl::Fp32Precision::kTf32)
FASTCL_EMULATED_ENTRY_POINTS(float, float, float32_tf32x3, fastcl::ScalarType::kFloat, fastcl::Fp32Precision::kTf32x3)
FASTCL_EMULATED_ENTRY_POINTS(__nv_bfloat16, float, bfloat16, fastcl::ScalarType::kBFloat16, kIeee)
FASTCL_EMULATED_ENTRY_POINTS(__half, float, float16, fastcl::ScalarType::kHalf, kIeee)
