"""Attention backends behind one interface; the runner picks one per device."""

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, PrefillChunk


def get_attention_backend(device: str) -> AttentionBackend:
    from pagedllm.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


__all__ = ["AttentionBackend", "AttentionMetadata", "PrefillChunk", "get_attention_backend"]
