// The CUDA kernels of block_kernels.cu compiled for the host: a launch runs as kThreads std::threads that
// execute its CTAs one after another (so a `__shared__` variable, here a function-local static, is the
// running CTA's shared memory), with __syncthreads as a barrier and warp shuffles through a per-warp
// exchange.
// Only the FMA paths (float32 without TF32, float64) build here — the WMMA paths need the tensor cores.
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
struct __half;  // named by the kernels' float16 prescale test; the 16-bit paths are not built here
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

// C entry points with block_host.cpp's signatures (tile, threads_per_row and operand are the kernels'
// own here and ignored), so the tests drive both builds the same way.
namespace {

template <typename acc_t>
fastcl::BlockArgs block_args(const acc_t* a, const acc_t* a_inv, const acc_t* k, const acc_t* k_inv,
                             const int64_t* rows, const int64_t* layout_ints, const acc_t* scalars,
                             const int64_t* pos_index, const int64_t* a_labels, const int64_t* k_labels,
                             const acc_t* mask) {
  fastcl::BlockArgs b{};
  b.dtype = std::is_same<acc_t, double>::value ? fastcl::ScalarType::kDouble : fastcl::ScalarType::kFloat;
  b.allow_tf32 = false;
  b.a = {a, rows[0], rows[1], rows[2], a_inv};
  b.k = {k, rows[3], rows[4], rows[5], k_inv};
  b.sub_dim = rows[6];
  b.tau = &scalars[0];
  b.layout = {int(layout_ints[0]), layout_ints[1], int(layout_ints[2]), int(layout_ints[3]), int(layout_ints[4]),
              &scalars[1], pos_index, a_labels, k_labels, mask, layout_ints[5], layout_ints[6]};
  return b;
}

}  // namespace

#define FASTCL_EMULATED_ENTRY_POINTS(acc_t, suffix)                                                                 \
  extern "C" const char* fastcl_block_forward_##suffix(                                                           \
      const acc_t* a, const acc_t* a_inv, const acc_t* k, const acc_t* k_inv, const int64_t* rows,                \
      const int64_t* layout_ints, const acc_t* scalars, const int64_t* pos_index, const int64_t* a_labels,        \
      const int64_t* k_labels, const acc_t* mask, int, int, acc_t* lse, acc_t* pos_sum, acc_t* pos_weight) {      \
    const fastcl::BlockArgs b =                                                                                   \
        block_args(a, a_inv, k, k_inv, rows, layout_ints, scalars, pos_index, a_labels, k_labels, mask);          \
    return fastcl::launch_block_forward(b, lse, pos_sum, pos_weight, nullptr);                                    \
  }                                                                                                               \
  extern "C" const char* fastcl_block_backward_##suffix(                                                          \
      const acc_t* a, const acc_t* a_inv, const acc_t* k, const acc_t* k_inv, const int64_t* rows,                \
      const int64_t* layout_ints, const acc_t* scalars, const int64_t* pos_index, const int64_t* a_labels,        \
      const int64_t* k_labels, const acc_t* mask, const acc_t* lse, const acc_t* alpha, const acc_t* beta, int,   \
      acc_t* d_a, acc_t* d_k, acc_t* grad_sums) {                                                                 \
    const fastcl::BlockArgs b =                                                                                   \
        block_args(a, a_inv, k, k_inv, rows, layout_ints, scalars, pos_index, a_labels, k_labels, mask);          \
    std::fill(d_a, d_a + rows[0] * rows[6], acc_t(0)); /* the op zero-fills its outputs too */                  \
    std::fill(d_k, d_k + rows[3] * rows[6], acc_t(0));                                                            \
    std::fill(grad_sums, grad_sums + 2 * rows[0], acc_t(0));                                                      \
    return fastcl::launch_block_backward(b, lse, alpha, beta, d_a, d_k, grad_sums, nullptr);                      \
  }

FASTCL_EMULATED_ENTRY_POINTS(float, float32)
FASTCL_EMULATED_ENTRY_POINTS(double, float64)
