"""Linear layers: the run-time layout of weights, and fused projections loaded in pieces.

A fused projection (q|k|v, gate|up) is one matmul at run time but several tensors in a
checkpoint; `MergedLinear` knows where each piece goes:

    weight rows:  [ q (heads*dim) | k (kv_heads*dim) | v (kv_heads*dim) ]

After loading, `Linear.prepare_for_inference()` picks how a bfloat16 weight runs on CPU:

- oneDNN can run bf16 here (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; see platform/cpu.py): the
  weight is repacked into oneDNN's blocked layout, the same numbers tiled for its matmul kernel,
  which then skips the per-call reorder. That is worth most at decode sizes: a one-row product
  runs several times faster than from the plain row-major weight.
- it cannot (AVX2-only CPUs): the weight stays bf16 and the C++ `bf16_linear` computes in
  float32 (csrc/linear.cpp): half the bytes of a float32 weight, float32 FMAs. A bf16 matmul
  there would run at under 1 GFLOP/s, and oneDNN's repack raises.

Tensor parallelism (Megatron-style; distributed/parallel_state.py says which rank this is):

    ColumnParallelLinear   W [out/tp, in]   each rank computes its slice of the output features
    RowParallelLinear      W [out, in/tp]   each rank multiplies its slice of the input features;
                                            the partial outputs are summed across ranks
    MergedLinear           column-parallel piece by piece: rank r holds its slice of q, of k
                           and of v (of gate and of up), so the local split stays [q|k|v]

so an attention block or MLP needs one all-reduce, after its row-parallel output projection.
Each rank loads only its part of a checkpoint tensor: a layer's `tp_shards` (parameter name ->
Shard) says which, and `attach_shards` hands that to the loader (model/weights.py). With one
rank none of this exists: no shards, no collective, the layers are plain Linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import (
    divide,
    kv_head_shard,
    kv_heads_per_rank,
    tp_group,
)
from pagedllm.logger import init_logger
from pagedllm.ops.cpu import cpu_ops
from pagedllm.platform.cpu import cpu_info

logger = init_logger(__name__)

PACK_BATCH_HINT = 128  # rows oneDNN tunes the packed layout for; any row count works


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None  # oneDNN's blocked layout of a bf16 weight
    float32_compute: bool = False  # bf16 weight, float32 arithmetic (CPUs without oneDNN bf16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T + bias, through the weight's run-time layout."""
        if self.packed_weight is not None and x.dtype == self.packed_weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")
        if self.float32_compute and x.dtype == torch.bfloat16:
            return bf16_linear(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def prepare_for_inference(self) -> None:
        """Choose how a CPU bf16 weight runs: oneDNN's packed layout where this CPU runs bf16,
        else float32 arithmetic on the bf16 weight (see the module docstring)."""
        weight = self.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            return
        if cpu_info().onednn_bf16 and torch.backends.mkldnn.is_available():
            try:
                self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                            PACK_BATCH_HINT)
                return
            except RuntimeError as exc:  # the probe said yes, oneDNN says no: never crash
                logger.warning("oneDNN cannot pack bf16 weights here (%s); computing in "
                               "float32", exc)
        self.float32_compute = True


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for bf16 x and weight, in float32 arithmetic, rounded to bf16 once."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    ops = cpu_ops()
    if ops is None:  # no compiler here: the same numbers from PyTorch's float32 matmul
        out = F.linear(rows.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16).view(*x.shape[:-1], weight.shape[0])
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    ops.bf16_linear(out, rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


# ---- tensor parallelism ---------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """The part of a checkpoint tensor one rank holds: chunk `index` of `parts` equal chunks
    along `dim`. `padded`: the chunk is ceil(size / parts) long and the last ones may run past
    the tensor's end, zero-filled (a vocabulary that `parts` does not divide)."""

    dim: int
    index: int
    parts: int
    padded: bool = False

    def length(self, size: int) -> int:
        return -(-size // self.parts) if self.padded else divide(size, self.parts, "rows")

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.shape[self.dim]
        length = self.length(size)
        start = min(self.index * length, size)
        part = tensor.narrow(self.dim, start, min(length, size - start))
        if part.shape[self.dim] == length:
            return part
        shape = list(part.shape)
        shape[self.dim] = length - part.shape[self.dim]
        return torch.cat([part, part.new_zeros(shape)], dim=self.dim)


@dataclass(frozen=True)
class FusedShard:
    """A fused tensor stored whole in the checkpoint (Phi-3's qkv_proj): cut into its pieces
    (`sizes` rows each), each piece's own shard taken, the parts joined again."""

    sizes: tuple[int, ...]
    pieces: tuple[Shard, ...]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] != sum(self.sizes):
            return tensor  # the loader's shape check names the mismatch
        parts = tensor.split(list(self.sizes), dim=0)
        return torch.cat([shard.take(part) for shard, part in zip(self.pieces, parts)])


def attach_shards(model: nn.Module) -> None:
    """Mark each parameter a rank holds only part of with its Shard (`param.tp_shard`), for the
    loader. Called once the parameters have their memory: moving a model off the meta device
    makes new Parameter objects, which would lose the mark."""
    for module in model.modules():
        for name, shard in getattr(module, "tp_shards", {}).items():
            param = getattr(module, name, None)
            if param is not None:
                param.tp_shard = shard


def even_shard(dim: int, padded: bool = False) -> Shard:
    tp = tp_group()
    return Shard(dim, tp.rank, tp.size, padded)


class ColumnParallelLinear(Linear):
    """out_features split across the tensor-parallel ranks: each computes its slice."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, divide(out_features, tp_group().size, "output features"),
                         bias=bias)
        if tp_group().size > 1:
            self.tp_shards = {"weight": even_shard(0), "bias": even_shard(0)}


class RowParallelLinear(Linear):
    """in_features split across the ranks: each multiplies its slice of x (the column-parallel
    layer before it left exactly that slice on the rank), and one all-reduce sums the partial
    outputs; the bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(divide(in_features, tp_group().size, "input features"), out_features,
                         bias=bias)
        self.tp = tp_group()
        if self.tp.size > 1:
            self.tp_shards = {"weight": even_shard(1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        out = self.tp.all_reduce(self.matmul(x, None))
        return out if self.bias is None else out.add_(self.bias)


class MergedLinear(Linear):
    """Several projections in one matmul (q|k|v, gate|up), column-parallel piece by piece.

    `output_sizes` are the pieces' full sizes; `piece_shards` which part of each piece this
    rank holds (default: an even split of every piece). `output_sizes` afterwards holds the
    local sizes, the split the forward pass makes."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 piece_shards: list[Shard] | None = None) -> None:
        shards = piece_shards or [even_shard(0) for _ in output_sizes]
        local = [shard.length(size) for shard, size in zip(shards, output_sizes, strict=True)]
        super().__init__(in_features, sum(local), bias=bias)
        self.output_sizes = local
        self.offsets = [sum(local[:i]) for i in range(len(local))]
        self.piece_shards = shards if tp_group().size > 1 else None
        if self.piece_shards:
            whole = FusedShard(tuple(output_sizes), tuple(shards))
            self.tp_shards = {"weight": whole, "bias": whole}

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        if self.piece_shards:
            tensor = self.piece_shards[shard].take(tensor)
        target = getattr(self, param_name)
        start, size = self.offsets[shard], self.output_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} of {param_name} has {tensor.shape[0]} rows, "
                             f"expected {size}")
        with torch.no_grad():
            target[start : start + size].copy_(tensor)


class QKVLinear(MergedLinear):
    """The fused q|k|v projection, split by heads: each rank holds num_heads / tp query heads
    and num_kv_heads / tp KV heads, or, with fewer KV heads than ranks, a copy of the one KV
    head its query heads attend to. `num_heads`, `num_kv_heads`: this rank's."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False) -> None:
        tp = tp_group()
        self.num_heads = divide(num_heads, tp.size, "attention heads")
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp.size)
        kv = Shard(0, *kv_head_shard(num_kv_heads, tp.rank, tp.size))
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], bias, [even_shard(0), kv, kv])


class VocabParallelEmbedding(nn.Embedding):
    """The token embedding split by vocabulary rows: rank r holds rows [r*n, (r+1)*n), n =
    ceil(vocab / tp) (the last rank's tail zero-padded). Each rank looks up the ids in its
    range, zeros for the rest, and one all-reduce assembles every row."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        shard = even_shard(0, padded=True)
        super().__init__(shard.length(num_embeddings), embedding_dim)
        self.tp = tp_group()
        self.vocab_size = num_embeddings
        self.first_id = self.tp.rank * self.num_embeddings
        if self.tp.size > 1:
            self.tp_shards = {"weight": shard}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.first_id
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """The output projection split by vocabulary rows as VocabParallelEmbedding is (so tied
    weights are one tensor): each rank computes its columns of the logits, and they are
    gathered on the first rank only, where sampling happens; elsewhere forward returns None."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        shard = even_shard(0, padded=True)
        super().__init__(hidden_size, shard.length(vocab_size), bias=False)
        self.tp = tp_group()
        self.vocab_size = vocab_size
        if self.tp.size > 1:
            self.tp_shards = {"weight": shard}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().forward(hidden)
        if self.tp.size == 1:
            return logits
        full = self.tp.gather(logits, dim=-1)
        return None if full is None else full[:, : self.vocab_size].contiguous()


def prepare_for_inference(model: nn.Module) -> None:
    """Run-time weight layouts, once every weight is loaded: float Linear layers and the
    quantized layers that replace them (model/layers/quantization/) each know their own."""
    for module in model.modules():
        prepare = getattr(module, "prepare_for_inference", None)
        if callable(prepare) and module is not model:
            prepare()
