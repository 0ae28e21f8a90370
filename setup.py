"""Build script of delt-ext: the `delt_ext` C++/CUDA extension and the `delt` orchestration layer.

Install with ``pip install --no-build-isolation .`` after installing torch: the extension is
compiled against the torch that is already installed. Build switches (environment variables):

  FORCE_CUDA=1            build the CUDA kernels (fails clearly if torch or the toolkit lacks CUDA)
  FORCE_ONLY_CPU=1        build the CPU kernels only
  TORCH_CUDA_ARCH_LIST    archs to compile for; default: the visible GPUs, else DEFAULT_CUDA_ARCHS
  MAX_JOBS                parallel compile jobs (ninja)
  NVCC_FLAGS              extra nvcc flags, shell-split; fast-math flags are refused (see below)
  DEBUG=1                 -O0 -g host code, -G device code
"""

import glob
import os
import re
import shlex
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "delt-ext: torch is not installed. Install torch first, then run "
        "`pip install --no-build-isolation .`"
    )

# A100, RTX 30xx/40xx (sm_86 code runs on sm_89), H100/H200, and PTX for newer GPUs.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.getenv(name, "0") == "1"


# Flags that change floating-point results of the CUDA kernels: the crop op's sampling positions
# must be PyTorch's (an FMA, IEEE division), and the BN statistics' NaN/Inf handling needs IEEE
# semantics. Refused in NVCC_FLAGS and in nvcc's own NVCC_APPEND_FLAGS / NVCC_PREPEND_FLAGS,
# also when passed to the host compiler (-Xcompiler=-ffast-math).
FAST_MATH = re.compile(
    r"(?:^|[\s,=])-{1,2}(?:use_fast_math|ffast-math|ffinite-math-only|funsafe-math-optimizations"
    r"|Ofast|ftz[=\s]+true|prec-div[=\s]+false|prec-sqrt[=\s]+false)(?=$|[\s,])"
)


def _check_nvcc_flags() -> None:
    for variable in ("NVCC_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS"):
        value = " ".join(shlex.split(os.getenv(variable, "")))
        match = FAST_MATH.search(value)
        if match:
            sys.exit(
                f"delt-ext: {variable} contains {match.group(0).strip(' ,=')!r}: fast-math flags "
                "change the CUDA kernels' results (crop sampling positions, NaN/Inf handling) and "
                "are not supported; remove it."
            )


def _with_cuda() -> bool:
    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit(f"delt-ext: FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build.")
        if CUDA_HOME is None:
            sys.exit("delt-ext: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME.")
        return True
    # No visible GPU is needed: a CUDA torch plus a toolkit is enough to compile the kernels.
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    _check_nvcc_flags()
    with_cuda = _with_cuda()
    debug = _flag("DEBUG")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # -Wno-psabi: the CPU kernels pass 32-byte vectors between inlined helpers on purpose.
    cxx_flags += ["-fvisibility=hidden", "-Wno-psabi"]
    if "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is inline and needs OpenMP here; the runtime itself is the one torch
        # loaded (no -fopenmp at link time), so torch.set_num_threads governs our kernels too.
        cxx_flags.append("-fopenmp")
    define_macros = []
    extension = CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    if with_cuda:
        extension = CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("WITH_CUDA", None))
        if not os.getenv("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            # cpp_extension would otherwise fail with an IndexError when no GPU is visible.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        nvcc_flags = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags.append("--expt-relaxed-constexpr")
        nvcc_flags += shlex.split(os.getenv("NVCC_FLAGS", ""))
        extra_compile_args["nvcc"] = nvcc_flags
    archs = os.getenv("TORCH_CUDA_ARCH_LIST", "visible GPUs") if with_cuda else "-"
    print(
        f"delt-ext build: torch {torch.__version__}, torch CUDA {torch.version.cuda}, "
        f"CUDA_HOME {CUDA_HOME}, CUDA kernels {'yes' if with_cuda else 'no'}, archs {archs}, "
        f"MAX_JOBS {os.getenv('MAX_JOBS', 'default')}",
        flush=True,
    )
    return [
        extension(
            "delt_ext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            py_limited_api=False,
        )
    ]


setup(
    packages=find_packages(include=["delt_ext", "delt_ext.*"])
    + find_packages("python", include=["delt", "delt.*"]),
    package_dir={"delt": "python/delt"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
