"""The attention interface and the batch description every backend reads.

A step's tokens are one flat batch. Decode tokens (one new token per sequence) come first, then
the prefill chunks, each a run of consecutive tokens of one sequence:

    tokens:  d0 d1 d2 | p0 p0 p0 p0 p0 | p1 p1 p1
             decodes    chunk of seq A   chunk of seq B

Every new token's K and V are first written into the paged pools at its slot
(`block_id * block_size + offset`); attention then reads all of a sequence's context, cached and
new alike, through its block table.

KV pools, per layer:  key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]
in the model's dtype, or fp8 with per-layer scales (attention/kv_quant.py).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from pagedllm.attention.kv_quant import KVScales


@dataclass(slots=True)
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the flat batch
    query_len: int
    context_len: int  # tokens of the sequence after this chunk (cached prefix + chunk)
    block_table: torch.Tensor  # [cdiv(context_len, block_size)] block ids


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V go
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks], padded with block 0
    decode_seq_lens: torch.Tensor  # [num_decodes] context length including the new token
    prefills: list[PrefillChunk]
    block_size: int

    def sequence_length_per_token(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens] the length of each token's sequence once this step's tokens are in."""
        lengths = torch.empty(num_tokens, dtype=torch.long, device=self.slot_mapping.device)
        lengths[: self.num_decodes] = self.decode_seq_lens
        for chunk in self.prefills:
            lengths[chunk.query_start : chunk.query_start + chunk.query_len] = chunk.context_len
        return lengths


class AttentionBackend(abc.ABC):
    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        kv_scales: KVScales | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Causal attention of every new token over its sequence's context.

        sliding_window: a query at position i sees only keys at positions j with
            i - sliding_window < j <= i (the window counts the query itself), as in transformers.
        soft_cap: scores (after scaling) become soft_cap * tanh(score / soft_cap) before the
            softmax (Gemma 2).
        """
