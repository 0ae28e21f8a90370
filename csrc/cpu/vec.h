// Portable SIMD helpers for the CPU kernels: GCC/Clang vector extensions (SSE2/NEON by default)
// plus function multi-versioning, so hot loops also get an AVX2+FMA build that is picked at load
// time on CPUs that have it (x86-64 Linux with GCC). The functions using DELT_CPU_CLONES touch
// only raw pointers: no inline library code is compiled for two instruction sets.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DELT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DELT_CPU_CLONES
#endif

namespace delt_ext::cpu {

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));

// The 32-byte lane vector of a float type, and how many values it holds.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  using type = f32x8;
};
template <>
struct Lanes<double> {
  using type = f64x4;
};
template <typename T>
using vec_t = typename Lanes<T>::type;
template <typename T>
inline constexpr int kLanes = sizeof(vec_t<T>) / sizeof(T);

template <typename V, typename T>
inline V load_unaligned(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store_unaligned(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T>
inline V broadcast(T value) {
  return value - V{};
}

}  // namespace delt_ext::cpu
