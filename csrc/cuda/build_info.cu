#include <cuda_runtime_api.h>

#include "build_info.h"

namespace delt_ext {

int64_t compiled_cuda_version() { return CUDART_VERSION; }

std::vector<int64_t> compiled_cuda_archs() {
  // nvcc defines __CUDA_ARCH_LIST__ as the comma-separated archs it compiles for (e.g. 750,900).
  std::vector<int64_t> archs = {__CUDA_ARCH_LIST__};
  for (int64_t& arch : archs) arch /= 10;
  return archs;
}

}  // namespace delt_ext
