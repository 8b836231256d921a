"""The C++ CPU kernels (pagedllm/csrc/), built once per ISA level and loaded by the CPU probe.

Every .cpp in csrc/ is compiled with one level's flags into its own module
(`pagedllm_cpu_ops_<level>`), so a single install serves AVX-512, AVX2 and other CPUs alike:
`cpu_ops()` loads the level `platform.cpu.cpu_info()` picks, `cpu_ops(level)` any level this CPU
executes (tests compare every one with the PyTorch reference). torch.utils.cpp_extension builds
a level on first use (about a minute on two cores) under $PAGEDLLM_CACHE_DIR/torch_extensions
and reuses it while the sources are unchanged; `make install` builds the machine's own level.

Where no compiler is available `cpu_ops()` returns None and callers keep their pure-PyTorch
path; PAGEDLLM_CPU_KERNELS=0 forces that path.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from pagedllm.config import cache_dir
from pagedllm.logger import init_logger
from pagedllm.platform.cpu import ISA_LEVELS, cpu_info, is_x86

logger = init_logger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
COMMON_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
ISA_FLAGS = {
    "portable": [],  # the compiler's baseline for this architecture (SSE2 on x86-64)
    "avx2": _AVX2,
    "avx512": _AVX512,
    "avx512_bf16": [*_AVX512, "-mavx512bf16", "-mavx512vnni"],
}


@functools.cache
def kernels_enabled() -> bool:
    """PAGEDLLM_CPU_KERNELS, read once per process: this is asked on every kernel call."""
    return os.environ.get("PAGEDLLM_CPU_KERNELS", "1") != "0"


def sources() -> list[str]:
    return sorted(str(path) for path in SOURCE_DIR.glob("*.cpp"))


def cpu_ops(level: str | None = None) -> ModuleType | None:
    """The kernels built for `level` (default: the probe's), or None when kernels are disabled
    or cannot be built here. A level this CPU cannot execute is a ValueError, never a load."""
    if level is None:  # every layer's hot path: the probe's level, already checked by the probe
        level = cpu_info().isa
    elif level not in ISA_LEVELS:
        raise ValueError(f"unknown kernel level {level!r}; choose from {', '.join(ISA_LEVELS)}")
    elif not cpu_info().can_run(level):
        raise ValueError(f"this CPU ({cpu_info().native_isa}) cannot run {level} kernels")
    return _build(level) if kernels_enabled() else None


@functools.cache
def _build(level: str) -> ModuleType | None:
    from torch.utils.cpp_extension import load

    name = f"pagedllm_cpu_ops_{level}"
    build_dir = cache_dir() / "torch_extensions" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = COMMON_FLAGS + (ISA_FLAGS[level] if is_x86() else [])
    try:
        with build_lock(build_dir):
            return load(name=name, sources=sources(), extra_cflags=flags,
                        extra_ldflags=["-fopenmp"], extra_include_paths=[str(SOURCE_DIR)],
                        build_directory=str(build_dir), verbose=False)
    except (OSError, RuntimeError, ImportError) as exc:  # no compiler, headers or ninja
        logger.warning("CPU kernels (%s) unavailable, using the PyTorch path: %s", level, exc)
        return None


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """One process at a time builds (or loads) a level; the others wait their turn.

    torch's own guard is a `lock` file that a build removes when it ends; a build that is killed
    (Ctrl-C, a timeout, an OOM kill) leaves it behind, and every later process then waits for
    it forever. An flock is released by the kernel when its holder dies, so holding one makes a
    `lock` file found here provably stale, and it is removed."""
    with open(build_dir / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernels_for(*tensors) -> ModuleType | None:
    """cpu_ops() when every tensor is a CPU float32/bfloat16 tensor (what the kernels take)."""
    if all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors):
        return cpu_ops()
    return None
