// Host emulation of the CUDA execution model, for running the kernels of csrc/cuda/*.cuh with the
// system C++ compiler (tests/test_cuda_emulation.py). Not part of the installed package.
//
// Every CUDA thread of a block is a fiber (its own stack, ucontext). A block's fibers run on one
// OS thread under a scheduler that switches only at the synchronization points of the CUDA model:
//   __syncthreads()     a block barrier: released when every thread of the block waits at one; a
//                       barrier reached while other threads have exited or wait at a shuffle is
//                       reported as an error (divergent barrier), as is a deadlock;
//   __shfl_down_sync()  a warp exchange: released when every lane named by the mask (the full
//                       warp) waits at one; each lane then reads the value its source lane had at
//                       the exchange (so a value is never read after its lane moved on); a mask
//                       naming lanes that do not exist or have exited is an error.
// Between those points a thread runs alone, so the emulation is deterministic. Blocks are
// independent (no inter-block communication in these kernels) and run on a few OS threads.
// __shared__ variables are thread_local statics (one copy per OS thread, so per running block);
// dynamic shared memory is a per-block buffer filled with 0xff bytes (NaN for float types), so
// reading it before writing shows. Vector loads and stores go through delt_load/delt_store, which
// check the alignment a GPU requires.
//
// What it does not model: the memory model (no caches, no reordering, no races between blocks),
// timing and occupancy, device intrinsics' rounding (fast-math intrinsics are refused in setup.py),
// and register or shared-memory limits.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define DELT_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace delt_emu {

enum class Wait { kNone, kBarrier, kShuffle, kDone };

struct Fiber {
  ucontext_t context;
  dim3 thread_idx;
  int linear = 0;
  Wait wait = Wait::kNone;
  // The pending shuffle: value (up to 8 bytes), source-lane rule, and the value received.
  uint64_t value = 0, result = 0;
  unsigned mask = 0, delta = 0;
  int width = 32, size = 0;
};

struct BlockState {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<std::vector<unsigned char>> stacks;
  std::vector<unsigned char> dynamic_shared;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const void* body = nullptr;  // the kernel call (std::function-free: a type-erased callable)
  void (*invoke)(const void*) = nullptr;
  std::exception_ptr error;
};

inline thread_local BlockState* g_block = nullptr;

inline BlockState& block() { return *g_block; }
inline Fiber& fiber() { return *g_block->current; }

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const std::string& what) {
  const BlockState& b = block();
  throw Error("cuda emulation: block (" + std::to_string(b.block_idx.x) + "," +
              std::to_string(b.block_idx.y) + "," + std::to_string(b.block_idx.z) + "): " + what);
}

// Back to the scheduler until this thread is released.
inline void yield(Wait why) {
  Fiber& f = fiber();
  f.wait = why;
  swapcontext(&f.context, &block().scheduler);
}

inline void fiber_entry() {
  BlockState& b = block();
  try {
    b.invoke(b.body);
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  fiber().wait = Wait::kDone;
  swapcontext(&fiber().context, &b.scheduler);  // never resumed
}

constexpr size_t kStackBytes = 64 * 1024;

// Runs one block to completion on the calling OS thread.
inline void run_block(BlockState& b) {
  const unsigned threads = b.block_dim.x * b.block_dim.y * b.block_dim.z;
  b.fibers.assign(threads, Fiber{});
  if (b.stacks.size() < threads) b.stacks.resize(threads);
  ucontext_t prototype;
  getcontext(&prototype);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = static_cast<int>(t);
    f.thread_idx = dim3(t % b.block_dim.x, t / b.block_dim.x % b.block_dim.y,
                        t / (b.block_dim.x * b.block_dim.y));
    if (b.stacks[t].size() < kStackBytes) b.stacks[t].resize(kStackBytes);
    f.context = prototype;
    f.context.uc_stack.ss_sp = b.stacks[t].data();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  const unsigned warps = (threads + 31) / 32;
  for (;;) {
    for (Fiber& f : b.fibers) {
      if (f.wait != Wait::kNone) continue;
      b.current = &f;
      swapcontext(&b.scheduler, &f.context);
      b.current = nullptr;
      if (b.error) std::rethrow_exception(b.error);
    }
    bool released = false, all_done = true;
    for (unsigned w = 0; w < warps; ++w) {
      const unsigned first = w * 32, last = std::min(threads, first + 32);
      unsigned waiting = 0;
      for (unsigned t = first; t < last; ++t) waiting += b.fibers[t].wait == Wait::kShuffle;
      if (waiting == 0) continue;
      // Every lane of the mask must exist and wait at a shuffle of the same kind.
      const Fiber& lead = b.fibers[first];
      for (unsigned t = first; t < last; ++t) {
        const Fiber& f = b.fibers[t];
        if (f.wait != Wait::kShuffle) {
          fail("warp " + std::to_string(w) + ": lane " + std::to_string(t - first) +
               (f.wait == Wait::kDone ? " exited" : " waits at __syncthreads") +
               " while other lanes wait at a shuffle");
        }
        if (f.mask != lead.mask || f.width != lead.width || f.size != lead.size) {
          fail("warp " + std::to_string(w) + ": lanes disagree on the shuffle's mask/width/type");
        }
      }
      const unsigned lanes = last - first;
      const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      if ((lead.mask & ~full) != 0 || lead.mask != 0xffffffffu) {
        fail("warp " + std::to_string(w) + ": shuffle mask names lanes that do not exist");
      }
      if (lead.width <= 0 || lead.width > 32 || (lead.width & (lead.width - 1)) != 0) {
        fail("shuffle width must be a power of two <= 32");
      }
      for (unsigned t = first; t < last; ++t) {
        Fiber& f = b.fibers[t];
        const unsigned lane = t - first, in_segment = lane % f.width;
        const unsigned src = in_segment + f.delta < static_cast<unsigned>(f.width) ? lane + f.delta
                                                                                   : lane;
        f.result = b.fibers[first + src].value;
      }
      for (unsigned t = first; t < last; ++t) b.fibers[t].wait = Wait::kNone;
      released = true;
    }
    if (released) continue;
    unsigned at_barrier = 0, done = 0;
    for (const Fiber& f : b.fibers) {
      at_barrier += f.wait == Wait::kBarrier;
      done += f.wait == Wait::kDone;
    }
    if (done == threads) return;
    all_done = false;
    (void)all_done;
    if (at_barrier + done == threads) {
      if (done > 0) {
        fail(std::to_string(at_barrier) + " threads wait at __syncthreads but " +
             std::to_string(done) + " have exited (divergent barrier)");
      }
      for (Fiber& f : b.fibers) f.wait = Wait::kNone;
      continue;
    }
    fail("deadlock");
  }
}

template <typename F>
void invoke_callable(const void* f) {
  (*static_cast<const F*>(f))();
}

// Limits a real GPU enforces, checked at launch.
inline void check_launch(dim3 grid, dim3 block_dim, size_t shared) {
  const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || block_dim.z > 64) {
    throw Error("cuda emulation: invalid block size " + std::to_string(threads));
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u) {
    throw Error("cuda emulation: invalid grid (" + std::to_string(grid.x) + ", " +
                std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
  }
  if (shared > 48 * 1024) {
    throw Error("cuda emulation: " + std::to_string(shared) + " bytes of dynamic shared memory");
  }
}

inline int& worker_threads() {
  static int n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

// Counts launches, for tests of the launch structure.
inline std::atomic<int64_t>& launch_count() {
  static std::atomic<int64_t> n{0};
  return n;
}

// kernel<<<grid, block, shared>>>(...) : runs every block, in parallel over a few OS threads.
template <typename F>
void launch(dim3 grid, dim3 block_dim, size_t shared, const F& body) {
  check_launch(grid, block_dim, shared);
  ++launch_count();
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::atomic<uint64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    BlockState state;
    state.block_dim = block_dim;
    state.grid_dim = grid;
    state.body = &body;
    state.invoke = &invoke_callable<F>;
    BlockState* previous = g_block;
    g_block = &state;
    try {
      for (uint64_t i = next++; i < blocks; i = next++) {
        state.block_idx = dim3(static_cast<unsigned>(i % grid.x),
                               static_cast<unsigned>(i / grid.x % grid.y),
                               static_cast<unsigned>(i / (uint64_t{grid.x} * grid.y)));
        state.dynamic_shared.assign(shared, 0xff);
        run_block(state);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = blocks;
    }
    g_block = previous;
  };
  const int workers = static_cast<int>(std::min<uint64_t>(blocks, worker_threads()));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

template <typename T>
T shfl_down(unsigned mask, T value, unsigned delta, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  Fiber& f = fiber();
  f.value = 0;
  std::memcpy(&f.value, &value, sizeof(T));
  f.mask = mask;
  f.delta = delta;
  f.width = width;
  f.size = sizeof(T);
  yield(Wait::kShuffle);
  T out;
  std::memcpy(&out, &fiber().result, sizeof(T));
  return out;
}

}  // namespace delt_emu

#define threadIdx (::delt_emu::fiber().thread_idx)
#define blockIdx (::delt_emu::block().block_idx)
#define blockDim (::delt_emu::block().block_dim)
#define gridDim (::delt_emu::block().grid_dim)

inline void __syncthreads() { ::delt_emu::yield(::delt_emu::Wait::kBarrier); }

template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::delt_emu::shfl_down(mask, value, delta, width);
}

// ---- the hooks of csrc/cuda/compat.cuh ---------------------------------------------------------

#define DELT_LAUNCH(kernel, grid, block_dim, shared, stream, ...) \
  ::delt_emu::launch((grid), (block_dim), (shared), [&] { kernel(__VA_ARGS__); })
#define DELT_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::delt_emu::block().dynamic_shared.data())
#define DELT_DEVICE_GUARD(tensor) (void)(tensor)
#define DELT_DEVICE_CHECK(cond, message)                                       \
  do {                                                                         \
    if (!(cond)) ::delt_emu::fail(std::string("device check failed: ") + (message)); \
  } while (0)

namespace delt_ext::cuda {
inline cudaStream_t current_stream() { return nullptr; }

template <typename P>
inline P load(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(P) != 0) {
    ::delt_emu::fail("misaligned " + std::to_string(sizeof(P)) + "-byte load");
  }
  P v;
  std::memcpy(&v, p, sizeof(P));
  return v;
}

template <typename P>
inline void store(void* p, const P& v) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(P) != 0) {
    ::delt_emu::fail("misaligned " + std::to_string(sizeof(P)) + "-byte store");
  }
  std::memcpy(p, &v, sizeof(P));
}
}  // namespace delt_ext::cuda
