"""BERT encoders: sentence-transformers embedders (BertModel) and cross-encoders
(BertForSequenceClassification).

    tokens -> word + absolute position + token type embeddings -> LayerNorm
    per layer:  x -> qkv -> bidirectional attention -> dense -> LayerNorm(. + x)
                  -> intermediate (GELU) -> output -> LayerNorm(. + x)
    classifier: hidden[CLS] -> pooler (dense, tanh) -> classifier -> logits

An encoder sees its whole prompt at once and keeps no KV: the pooling runner calls `encode`
with each sequence's length instead of the paged-attention metadata (attention/encoder.py).
q/k/v are fused into one matmul, loaded in pieces from the checkpoint's query/key/value.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedllm.attention import AttentionMetadata
from pagedllm.attention.encoder import EncoderBatch, bidirectional_attention
from pagedllm.model.layers.activation import Gelu
from pagedllm.model.layers.linear import Linear
from pagedllm.model.weights import copy_checked

QKV_PIECES = {"query": 0, "key": 1, "value": 2}
# checkpoint name piece of a layer -> ours
LAYER_NAMES = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                  + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(hidden)


class BertLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.head_dim = size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(size, 3 * size)
        self.attn_out = Linear(size, size)
        self.attn_norm = nn.LayerNorm(size, eps=eps)
        self.intermediate = Linear(size, config.intermediate_size)
        self.act = Gelu(config.hidden_act)
        self.output = Linear(config.intermediate_size, size)
        self.output_norm = nn.LayerNorm(size, eps=eps)

    def forward(self, hidden: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        qkv = self.qkv(hidden).view(-1, 3, self.num_heads, self.head_dim)
        attended = bidirectional_attention(qkv, batch, self.scale)
        hidden = self.attn_norm(self.attn_out(attended.reshape(hidden.shape)) + hidden)
        return self.output_norm(self.output(self.act(self.intermediate(hidden))) + hidden)


class BertModel(nn.Module):
    """The encoder; as a model of its own, an embedder (pooled as configured)."""

    is_encoder = True  # the pooling runner calls encode(), without the paged KV cache
    default_pooling_type = "CLS"  # vLLM's default for a bare BertModel (sentence-transformers
    # checkpoints say their own in 1_Pooling/config.json)
    prefix = ""  # checkpoint names of the encoder start with this

    def __init__(self, config: PretrainedConfig, max_model_len: int = 0,
                 backend: object = None) -> None:
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT with {config.position_embedding_type!r} position embeddings "
                             "is not supported (absolute only)")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.hidden_size = config.hidden_size

    def encode(self, input_ids: torch.Tensor, positions: torch.Tensor,
               token_type_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """[num_tokens] flat batch of whole sequences, `seq_lens` tokens each ->
        [num_tokens, hidden] last hidden states."""
        batch = EncoderBatch.build(seq_lens, input_ids.device)
        hidden = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.layers:
            hidden = layer(hidden, batch)
        return hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: object,
                metadata: AttentionMetadata, intermediate: object = None) -> torch.Tensor:
        """The decoders' call (the GPU memory plan profiles a step with it): each decode row
        and prefill chunk a whole sequence of token type 0; no KV cache is read or written."""
        seq_lens = [1] * metadata.num_decodes + [c.query_len for c in metadata.prefills]
        return self.encode(input_ids, positions, torch.zeros_like(input_ids), seq_lens)

    def compute_logits(self, hidden: torch.Tensor) -> None:
        return None  # no language-model head

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        for name, tensor in weights:
            ours = self.our_name(name)
            if ours is None:
                continue
            if isinstance(ours, tuple):  # a piece of the fused qkv
                ours, piece = ours
                rows = params[ours].shape[0] // 3
                copy_checked({ours: params[ours][piece * rows : (piece + 1) * rows]}, ours,
                             tensor)
                continue
            copy_checked(params, ours, tensor)

    def our_name(self, name: str) -> str | tuple[str, int] | None:
        """The parameter a checkpoint tensor fills (with the qkv piece), or None to skip it."""
        if not name.startswith(self.prefix):
            return self.head_name(name)
        name = name[len(self.prefix):]
        if name == "embeddings.position_ids" or name.startswith("pooler."):
            return self.pooler_name(name)
        if not name.startswith("encoder.layer."):
            return name
        index, _, rest = name[len("encoder.layer."):].partition(".")
        stem, _, kind = rest.rpartition(".")
        if stem.startswith("attention.self."):
            return f"layers.{index}.qkv.{kind}", QKV_PIECES[stem.rpartition(".")[2]]
        if stem not in LAYER_NAMES:
            raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        return f"layers.{index}.{LAYER_NAMES[stem]}.{kind}"

    def pooler_name(self, name: str) -> str | None:
        """An embedder has no use for BERT's pooler (dense + tanh), nor the position ids."""
        return None

    def head_name(self, name: str) -> str | None:
        raise ValueError(f"checkpoint has an unexpected weight {name!r}")


class BertForSequenceClassification(BertModel):
    """A cross-encoder or classifier: the CLS row through BERT's pooler and a linear head."""

    default_pooling_type = "CLS"
    prefix = "bert."

    def __init__(self, config: PretrainedConfig, max_model_len: int = 0,
                 backend: object = None) -> None:
        super().__init__(config, max_model_len, backend)
        self.num_labels = config.num_labels
        self.pooler = Linear(config.hidden_size, config.hidden_size)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """[n, hidden] CLS rows -> [n, num_labels] logits."""
        return self.classifier(torch.tanh(self.pooler(pooled)))

    def pooler_name(self, name: str) -> str | None:
        return name.replace("pooler.dense", "pooler") if name.startswith("pooler.") else None

    def head_name(self, name: str) -> str | None:
        if name.startswith("classifier."):
            return name
        raise ValueError(f"checkpoint has an unexpected weight {name!r}")
