"""Shared set-up of the benchmarks.

glibc hands large freed blocks back to the kernel (blocks above the mmap threshold, and free
memory above the trim threshold at the top of the heap). The next allocation of a same-size
tensor, e.g. a 26 MB gradient, then page-faults on every 4 KiB page: about 6,400 faults and
several milliseconds on the VM these tables were measured on, or none, depending on the heap's
history, which differs between implementations and between runs. Pinning the allocator makes
every implementation run on warm memory, as a training loop in steady state does; without it,
the same benchmark swung by 2-3x from run to run. Users can get the same effect with the
environment variables MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824.
"""

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def _pin_glibc_heap() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's upper limit on 64-bit
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


_pin_glibc_heap()
