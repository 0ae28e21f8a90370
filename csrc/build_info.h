// What the build was compiled for, and the CPU-only build's stand-in for missing CUDA kernels.
#pragma once

#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace delt_ext {

#ifdef WITH_CUDA
// CUDA runtime version the kernels were compiled against, e.g. 13000 for 13.0
// (csrc/cuda/build_info.cu).
int64_t compiled_cuda_version();
// Compute capabilities with device code in the binary, e.g. {75, 80, 86, 90}.
std::vector<int64_t> compiled_cuda_archs();
#else
// Registers, for the CUDA dispatch key, a kernel that raises a clear "built without CUDA"
// error for each op (csrc/delt_ext.cpp). Call from TORCH_LIBRARY_IMPL(delt_ext, CUDA, m).
void register_missing_cuda(torch::Library& m, std::initializer_list<const char*> ops);
#endif

}  // namespace delt_ext
