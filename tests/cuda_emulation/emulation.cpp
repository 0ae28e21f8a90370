// The CUDA entry points of both op families (csrc/cuda/*.cuh), compiled for the host with the
// emulation of cuda_emulation.h, as a Python module for tests/test_cuda_emulation.py. Tensors
// are CPU tensors; every kernel launch runs the kernel body once per emulated CUDA thread.

#include <torch/extension.h>

#include "cuda_emulation.h"
#include "cuda/bn_stat_kernel.cuh"
#include "cuda/channel_sums_kernel.cuh"
#include "cuda/resized_crop_flip_kernel.cuh"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace delt_ext;
  m.def("batch_mean_var", &bn_cuda::batch_mean_var);
  m.def("bn_stat_loss", &bn_cuda::bn_stat_loss);
  m.def("batch_stat_backward", &bn_cuda::batch_stat_backward, pybind11::arg("x"),
        pybind11::arg("mean"), pybind11::arg("grad_mean"), pybind11::arg("grad_var"),
        pybind11::arg("grad_scale") = pybind11::none());
  m.def("bn_stat_loss_grouped", &bn_cuda::bn_stat_loss_grouped, pybind11::arg("x"),
        pybind11::arg("group_index"), pybind11::arg("target_mean"), pybind11::arg("target_var"),
        pybind11::arg("weight") = pybind11::none());
  m.def("grouped_stat_backward", &bn_cuda::grouped_stat_backward, pybind11::arg("x"),
        pybind11::arg("group_index"), pybind11::arg("mean"), pybind11::arg("grad_mean"),
        pybind11::arg("grad_var"), pybind11::arg("grad_scale") = pybind11::none());
  m.def("image_channel_sums", &sums_cuda::image_channel_sums);
  m.def("resized_crop_flip", &crop_cuda::resized_crop_flip);
  m.def("resized_crop_flip_backward", &crop_cuda::resized_crop_flip_backward);
  // Test hooks: the crop kernels' grid cap, the emulator's OS threads, the launch counter.
  m.def("set_max_blocks", [](int64_t n) {
    const int64_t before = crop_cuda::max_blocks();
    crop_cuda::max_blocks() = n > 0 ? n : crop_cuda::kMaxBlocks;
    return before;
  });
  m.def("set_sums_max_blocks", [](int64_t n) {
    const int64_t before = sums_cuda::max_blocks();
    sums_cuda::max_blocks() = n > 0 ? n : sums_cuda::kMaxBlocks;
    return before;
  });
  m.def("set_workers", [](int n) { delt_emu::worker_threads() = n > 0 ? n : 1; });
  m.def("last_bn_launch", [] {
    const auto& r = bn_cuda::last_launch();
    return pybind11::dict(pybind11::arg("channels_last") = r.channels_last,
                          pybind11::arg("load_width") = r.load_width,
                          pybind11::arg("backward_width") = r.backward_width,
                          pybind11::arg("grid") = pybind11::make_tuple(r.grid_x, r.grid_y));
  });
  m.def("launch_count", [] { return delt_emu::launch_count().load(); });
}
