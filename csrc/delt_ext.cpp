// The delt_ext op library: build-information ops and the Python module stub.
//
// Each op family declares its schemas in its own csrc/<op>.cpp (TORCH_LIBRARY_FRAGMENT), its CPU
// kernels in csrc/cpu/ and its CUDA kernels in csrc/cuda/ (TORCH_LIBRARY_IMPL per backend); fake
// kernels and autograd are registered from Python in delt_ext/ops.py.

#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <vector>

#include "build_info.h"

extern "C" {
// Importing delt_ext._C runs the static initializers of every file, which register the ops.
// The module itself is empty: every entry point is a dispatcher op (torch.ops.delt_ext.*).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace delt_ext {
namespace {

std::vector<int64_t> torch_version() {
  return {TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH};
}

int64_t cuda_version() {
#ifdef WITH_CUDA
  return compiled_cuda_version();
#else
  return 0;
#endif
}

std::vector<int64_t> cuda_archs() {
#ifdef WITH_CUDA
  return compiled_cuda_archs();
#else
  return {};
#endif
}

#ifndef WITH_CUDA
void built_without_cuda(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, op.schema().name(),
              " got a CUDA tensor, but delt_ext was built without CUDA kernels. Reinstall it "
              "where torch has CUDA and a CUDA toolkit is found (CUDA_HOME), e.g. `FORCE_CUDA=1 "
              "pip install --no-build-isolation .`; `python -m delt_ext` shows the build.");
}
#endif

}  // namespace

#ifndef WITH_CUDA
void register_missing_cuda(torch::Library& m, std::initializer_list<const char*> ops) {
  for (const char* name : ops) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&built_without_cuda>());
  }
}
#endif

TORCH_LIBRARY(delt_ext, m) {
  m.def("_torch_version() -> int[]", &torch_version);
  m.def("_cuda_version() -> int", &cuda_version);
  m.def("_cuda_archs() -> int[]", &cuda_archs);
}

}  // namespace delt_ext
