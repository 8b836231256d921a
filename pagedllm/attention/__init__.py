"""Attention backends behind one interface; the runner picks one per device."""

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, PrefillChunk


def get_attention_backend(device: str) -> AttentionBackend:
    """The C++ kernels on CPU where they build, the Triton kernels on CUDA; plain PyTorch
    otherwise."""
    from pagedllm.attention.torch_backend import TorchAttentionBackend

    if str(device).startswith("cuda"):
        # imported here: triton is an optional dependency (the `cuda` extra), unused on CPU
        from pagedllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if str(device).startswith("cpu"):
        from pagedllm.ops.cpu import cpu_ops

        ops = cpu_ops()
        if ops is not None:
            from pagedllm.attention.cpu_backend import CpuAttentionBackend

            return CpuAttentionBackend(ops)
    return TorchAttentionBackend()


__all__ = ["AttentionBackend", "AttentionMetadata", "PrefillChunk", "get_attention_backend"]
