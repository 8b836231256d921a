"""The CPU probe: kernel level and oneDNN bf16 from the CPU's flags, and the override."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedllm.ops import cpu as cpu_ops_module
from pagedllm.platform import cpu
from pagedllm.platform.cpu import probe

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # AMD Zen 3
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}  # Skylake-X
ZEN4 = AVX512 | {"avx512_bf16", "avx512_vnni"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.fixture
def on_x86(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")


@pytest.mark.parametrize("flags,level,onednn", [
    (ZEN4, "avx512_bf16", True),
    (AVX512, "avx512", True),
    (AVX2, "avx2", False),
    (AVX2 | {"avx_ne_convert"}, "avx2", True),  # AVX2-only Intel cores with AVX-NE-CONVERT
    (AVX2 - {"fma"}, "portable", False),
    (frozenset(), "portable", False),
])
def test_level_and_onednn_follow_the_flags(on_x86, flags, level, onednn):
    info = probe(flags)
    assert (info.isa, info.native_isa, info.onednn_bf16) == (level, level, onednn)
    assert info.num_cores >= 1


def test_amx_counts_only_at_the_avx512_bf16_level(on_x86):
    assert probe(SAPPHIRE_RAPIDS).amx_bf16 and not probe(ZEN4).amx_bf16
    assert not probe(SAPPHIRE_RAPIDS, "avx512").amx_bf16


def test_other_architectures_are_portable(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert probe(ZEN4).isa == "portable"


def test_forcing_a_lower_level_stands_in_for_a_cpu_without_avx512(on_x86):
    info = probe(ZEN4, "avx2")
    assert (info.isa, info.native_isa, info.onednn_bf16) == ("avx2", "avx512_bf16", False)
    assert info.can_run("avx512_bf16") and "forced" in info.describe()
    assert probe(ZEN4, "avx512").onednn_bf16  # still an AVX-512 CPU


def test_forcing_more_than_the_cpu_has_or_an_unknown_level_is_refused(on_x86):
    with pytest.raises(ValueError, match="asks for more than this CPU has"):
        probe(AVX2, "avx512")
    with pytest.raises(ValueError, match="not a kernel level"):
        probe(AVX2, "sse9")


def test_cpu_info_reads_the_override_once(monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV, "portable")
    cpu.cpu_info.cache_clear()
    try:
        assert cpu.cpu_info().isa == "portable"
        monkeypatch.setenv(cpu.ISA_ENV, "avx2")
        assert cpu.cpu_info().isa == "portable"  # read once per process
    finally:
        monkeypatch.delenv(cpu.ISA_ENV)
        cpu.cpu_info.cache_clear()
    assert cpu.cpu_info().isa == cpu.cpu_info().native_isa


def test_kernels_for_a_level_the_cpu_lacks_are_refused_not_loaded(monkeypatch, on_x86):
    monkeypatch.setattr(cpu_ops_module, "cpu_info", lambda: probe(AVX2))
    with pytest.raises(ValueError, match="cannot run avx512 kernels"):
        cpu_ops_module.cpu_ops("avx512")
    with pytest.raises(ValueError, match="unknown kernel level"):
        cpu_ops_module.cpu_ops("avx1024")


def test_cpu_kernels_switch_off_gives_the_pytorch_path():
    """PAGEDLLM_CPU_KERNELS=0 (docs/cpu.md): no C++ kernels, and the CPU attention backend is
    the plain-PyTorch one."""
    code = ("from pagedllm.ops.cpu import cpu_ops\n"
            "from pagedllm.attention import get_attention_backend\n"
            "assert cpu_ops() is None\n"
            "print(type(get_attention_backend('cpu')).__name__)\n")
    env = {**os.environ, "PAGEDLLM_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TorchAttentionBackend"


def test_a_killed_build_s_lock_file_does_not_block_the_next(tmp_path):
    """torch's `lock` file, left by a build that was killed, is removed once the build flock is
    held (its holder would be alive, holding it, if the build were still running)."""
    from pagedllm.ops.cpu import build_lock

    (tmp_path / "lock").write_text("")
    with build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
