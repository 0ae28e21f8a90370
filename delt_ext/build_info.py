"""What the installed delt_ext was built with: ``python -m delt_ext`` prints it."""

from dataclasses import dataclass

import torch

from delt_ext._library import HAS_OPS, LIBRARY_PATH, LOAD_ERROR, PACKAGE_DIR, fallback_message
from delt_ext._version import __version__


@dataclass(frozen=True)
class BuildInfo:
    version: str
    torch_version: str  # the torch running now
    torch_cuda: str | None  # CUDA of the running torch (None for a CPU build)
    compiled_library: bool  # False: the pure-PyTorch fallback is in use
    load_error: str | None
    built_with_torch: str | None  # torch the library was compiled against
    cuda_kernels: bool
    cuda_version: str | None  # CUDA runtime the kernels were compiled with
    cuda_archs: tuple[str, ...]  # compute capabilities with device code, e.g. ("8.0", "9.0")
    cuda_available: bool  # a GPU is usable right now
    package_path: str = PACKAGE_DIR  # the delt_ext folder that was imported
    library_path: str | None = None  # the compiled _C file that was loaded
    fallback_reason: str = ""  # why the reference fallback is in use (empty when compiled)

    @property
    def active_path(self) -> str:
        """Which implementation the public functions run: the compiled ops or the fallback."""
        if self.compiled_library:
            return "compiled ops (torch.ops.delt_ext)"
        return "pure-PyTorch reference fallback (delt_ext.reference; correct but slow)"

    def __str__(self) -> str:
        rows = [
            ("delt_ext", self.version),
            ("torch", f"{self.torch_version} (CUDA {self.torch_cuda or 'none'})"),
            ("imported from", self.package_path),
            (
                "compiled library",
                f"loaded from {self.library_path}"
                if self.compiled_library
                else f"NOT loaded: {self.load_error}",
            ),
            ("active path", self.active_path),
        ]
        if self.compiled_library:
            rows += [
                ("built with torch", self.built_with_torch or "?"),
                ("CUDA kernels", "yes" if self.cuda_kernels else "no (CPU-only build)"),
            ]
            if self.cuda_kernels:
                rows += [
                    ("compiled CUDA", self.cuda_version or "?"),
                    ("CUDA archs", ", ".join(f"sm_{a.replace('.', '')}" for a in self.cuda_archs)),
                ]
        rows.append(("GPU available", "yes" if self.cuda_available else "no"))
        width = max(len(key) for key, _ in rows)
        text = "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
        if self.fallback_reason:
            text += "\n\n" + self.fallback_reason
        return text


def build_info() -> BuildInfo:
    """Build configuration of the installed package, read from the compiled library itself."""
    built_with = cuda_version = None
    archs: tuple[str, ...] = ()
    if HAS_OPS:
        ops = torch.ops.delt_ext
        built_with = ".".join(str(v) for v in ops._torch_version())
        code = ops._cuda_version()
        if code:
            cuda_version = f"{code // 1000}.{code % 1000 // 10}"
            archs = tuple(f"{a // 10}.{a % 10}" for a in ops._cuda_archs())
    return BuildInfo(
        version=__version__,
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        compiled_library=HAS_OPS,
        load_error=LOAD_ERROR,
        built_with_torch=built_with,
        cuda_kernels=cuda_version is not None,
        cuda_version=cuda_version,
        cuda_archs=archs,
        cuda_available=torch.cuda.is_available(),
        package_path=PACKAGE_DIR,
        library_path=LIBRARY_PATH,
        fallback_reason=fallback_message(),
    )
