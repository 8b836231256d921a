"""The C++ CPU kernels (pagedllm/csrc/cpu_ops.cpp), compiled on first use and cached.

torch.utils.cpp_extension builds the source once per machine (under a minute on two cores) into
$PAGEDLLM_CACHE_DIR/torch_extensions and reuses the build while the source is unchanged. The
build targets the machine it runs on (-march=native: AVX-512 where there is AVX-512).

Where no compiler is available `cpu_ops()` returns None and callers keep their pure-PyTorch
path; PAGEDLLM_CPU_KERNELS=0 forces that path (tests use it to compare the two).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import torch

from pagedllm.config import cache_dir
from pagedllm.logger import init_logger

logger = init_logger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_ops.cpp"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def kernels_enabled() -> bool:
    return os.environ.get("PAGEDLLM_CPU_KERNELS", "1") != "0"


@functools.cache
def cpu_ops() -> ModuleType | None:
    """The compiled module, or None when kernels are disabled or cannot be built here."""
    if not kernels_enabled():
        return None
    from torch.utils.cpp_extension import load

    build_dir = cache_dir() / "torch_extensions"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load(name="pagedllm_cpu_ops", sources=[str(SOURCE)], extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    except (OSError, RuntimeError, ImportError) as exc:  # no compiler, headers or ninja
        logger.warning("CPU kernels unavailable, using the PyTorch path: %s", exc)
        return None


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernels_for(*tensors) -> ModuleType | None:
    """cpu_ops() when every tensor is a CPU float32/bfloat16 tensor (what the kernels take)."""
    if all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors):
        return cpu_ops()
    return None

