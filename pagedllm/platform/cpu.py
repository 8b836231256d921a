"""The CPU capability probe: which kernel build runs here, and whether oneDNN can run bf16.

Read once per process (`cpu_info()`), logged at start-up. The kernel levels, lowest first:

    portable      plain C++, vectorized by the compiler for the target's baseline (also ARM)
    avx2          AVX2 + FMA + F16C (Zen 2/3, Haswell and later)
    avx512        AVX-512 F/BW/VL/DQ (Skylake-X and later, Zen 4)
    avx512_bf16   the above plus AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4)

PAGEDLLM_CPU_ISA=<level> runs a lower level than the hardware's (tests use it to exercise every
path the machine can execute); asking for a level the CPU lacks is an error, not a crash.

oneDNN packs bf16 weights only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT; without them
`torch.ops.mkldnn._reorder_linear_weight` raises, and plain bf16 matmuls crawl (under 1 GFLOP/s
on Zen 3), so the linear layers keep bf16 weights and compute in float32 there instead
(model/layers/linear.py). A forced level below avx512 also turns oneDNN's bf16 off, so one
AVX-512 machine can stand in for a CPU without it.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from pagedllm.logger import init_logger

logger = init_logger(__name__)

ISA_LEVELS = ("portable", "avx2", "avx512", "avx512_bf16")
ISA_ENV = "PAGEDLLM_CPU_ISA"

# /proc/cpuinfo flags each level needs on top of the level below it
LEVEL_FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_bf16": {"avx512_bf16", "avx512_vnni"},  # every bf16 CPU has VNNI (int8 dots)
}
ONEDNN_BF16_FLAGS = ({"avx512bw", "avx512vl", "avx512dq"}, {"avx_ne_convert"})


@dataclass(frozen=True, slots=True)
class CpuInfo:
    isa: str  # the kernel level in use: native_isa, or lower when forced
    native_isa: str  # the highest level this CPU executes
    onednn_bf16: bool  # oneDNN packs and multiplies bf16 weights at speed (at this level)
    amx_bf16: bool  # AMX tiles run oneDNN's bf16 matmuls (Sapphire Rapids on, at avx512_bf16)
    num_cores: int  # cores this process may run on

    def can_run(self, level: str) -> bool:
        return ISA_LEVELS.index(level) <= ISA_LEVELS.index(self.native_isa)

    def describe(self) -> str:
        forced = f" (forced by {ISA_ENV}; the CPU has {self.native_isa})" \
            if self.isa != self.native_isa else ""
        bf16 = "oneDNN bf16" if self.onednn_bf16 else "bf16 weights computed in float32"
        bf16 += " (AMX)" if self.amx_bf16 else ""
        return f"CPU kernels: {self.isa}{forced}; {bf16}; {self.num_cores} cores"


def cpu_flags() -> frozenset[str]:
    """The x86 feature flags the kernel reports (empty elsewhere or where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def is_x86() -> bool:
    """x86-64: the only architecture with levels above portable (and their compiler flags)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def native_level(flags: frozenset[str]) -> str:
    """The highest level whose flags (and every lower level's) the CPU has."""
    if not is_x86():
        return "portable"
    level = "portable"
    for candidate in ISA_LEVELS[1:]:
        if not LEVEL_FLAGS[candidate] <= flags:
            break
        level = candidate
    return level


def probe(flags: frozenset[str], forced: str | None = None) -> CpuInfo:
    """The capability record for a CPU with `flags`, at level `forced` if given."""
    native = native_level(flags)
    isa = forced or native
    if isa not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={forced!r} is not a kernel level; choose from "
                         f"{', '.join(ISA_LEVELS)}")
    if ISA_LEVELS.index(isa) > ISA_LEVELS.index(native):
        raise ValueError(f"{ISA_ENV}={forced} asks for more than this CPU has ({native})")
    onednn = any(needed <= flags for needed in ONEDNN_BF16_FLAGS)
    if isa != native and not isa.startswith("avx512"):
        onednn = False  # stand in for a CPU without AVX-512
    amx = "amx_bf16" in flags and isa == "avx512_bf16"
    return CpuInfo(isa=isa, native_isa=native, onednn_bf16=onednn, amx_bf16=amx,
                   num_cores=_num_cores())


def _num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def cpu_info() -> CpuInfo:
    """This process's CPU, probed once (PAGEDLLM_CPU_ISA applied); cache_clear() re-reads it."""
    info = probe(cpu_flags(), os.environ.get(ISA_ENV) or None)
    logger.info(info.describe())
    return info
