"""GGUF weights served as stored: llama.cpp's quantized blocks stay packed in memory.

Every projection the file stores quantized becomes a `GGUFLinear` holding the raw bytes, and a
quantized token embedding a `GGUFEmbedding`; F32/F16/BF16 tensors stay float layers.

    weight (uint8 parameter)  [rows, bytes_per_row]      one row = K / 32 (or 256) blocks
    ggml_type (int)           Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K

A fused projection whose pieces were stored with different types (Q4_K_M files keep attn_v and
ffn_down in Q6_K) cannot be one [rows, bytes] matrix: its `weight` is then one flat byte run,
each piece's rows one after the other, and a matmul runs per piece into its columns:

    weight  [ q rows x 144 B (Q4_K) | k rows x 144 B (Q4_K) | v rows x 210 B (Q6_K) ]
    runs     (0, q+k rows, Q4_K)                          (q+k, v rows, Q6_K)

On CPU the matmul is csrc/gguf_linear.cpp on the packed blocks. With bfloat16 activations it
first quantizes the activations to 8-bit blocks (llama.cpp's fast path: integer dot products,
Q4_0/Q4_1/Q8_0); with float32 activations it dequantizes each block into registers, so the
result is the dequantized float32 model's up to summation order. Elsewhere (CUDA, or no C++
kernels) each call dequantizes the weight in PyTorch (gguf_blocks.py) and runs a float matmul.

For the integer path, prepare_for_inference regroups a Q4_0/Q4_1/Q8_0 weight's rows 16 at a
time (csrc/gguf_interleaved.cpp draws the layout: the same bytes, in the order VNNI's dot
product reads them), and marks the parameter `gguf_interleaved`; every reader of the bytes (the
matmul, prefill's dequantization, a tied embedding's row lookup) passes that mark to the kernels.

The lm_head tied to a quantized token embedding shares its `weight` parameter (the loader's
tie): both read the same bytes, the embedding only the rows it looks up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pagedllm.model.layers.linear import Linear, MergedLinear
from pagedllm.model.layers.quantization.base import QuantizationMethod, frozen
from pagedllm.model.layers.quantization.gguf_blocks import BLOCK_FORMATS, FLOAT_TYPES, dequantize
from pagedllm.model.source import ModelSource
from pagedllm.ops.cpu import cpu_ops
from pagedllm.platform.cpu import cpu_info


@dataclass(frozen=True, slots=True)
class WeightRun:
    """Consecutive output rows of a layer stored with one ggml type."""

    row_start: int
    rows: int
    ggml_type: int
    byte_start: int  # into the flat weight (mixed-type layers only)
    row_bytes: int


def weight_runs(output_sizes: list[int], types: list[int], in_features: int) -> list[WeightRun]:
    """Group the pieces of a fused projection into runs of one type each."""
    runs: list[WeightRun] = []
    row, byte = 0, 0
    for size, ggml_type in zip(output_sizes, types, strict=True):
        row_bytes = BLOCK_FORMATS[ggml_type].row_bytes(in_features)
        if runs and runs[-1].ggml_type == ggml_type:
            last = runs[-1]
            runs[-1] = WeightRun(last.row_start, last.rows + size, ggml_type, last.byte_start,
                                 row_bytes)
        else:
            runs.append(WeightRun(row, size, ggml_type, byte, row_bytes))
        row, byte = row + size, byte + size * row_bytes
    return runs


GEMM_ROWS = 32  # from this many rows on (prefill) the kernel dequantizes and calls a GEMM
INT8_TYPES = frozenset({2, 3, 8})  # Q4_0, Q4_1, Q8_0: the integer-dot-product path
GROUP_ROWS = 16  # rows per group of a regrouped weight


def is_interleaved(weight: torch.Tensor) -> bool:
    """Whether the weight's bytes were regrouped by `interleave` (the mark is on the parameter,
    which a tied lm_head and embedding share)."""
    return getattr(weight, "gguf_interleaved", False)


def interleave(weight: nn.Parameter, ggml_type: int) -> None:
    """Regroup the weight's rows in place for the integer kernels (once: the mark stays)."""
    if not is_interleaved(weight):
        with torch.no_grad():
            weight.copy_(cpu_ops().gguf_interleave(weight, ggml_type))
        weight.gguf_interleaved = True


def gguf_matmul(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ggml_type: int,
                use_kernels: bool) -> None:
    """out[M, N] = x[M, K] @ W.T for a run's packed rows W [N, bytes_per_row]."""
    ops = cpu_ops() if use_kernels else None
    if ops is None:
        out.copy_(F.linear(x, dequantize(weight, ggml_type).to(x.dtype)))
    elif x.shape[0] >= GEMM_ROWS and x.dtype == torch.bfloat16 and cpu_info().onednn_bf16:
        # prefill in bf16 where oneDNN runs it natively (AMX here): several times the float32
        # GEMM the kernel's own prefill path calls
        dense = x.new_empty(weight.shape[0], x.shape[1])
        ops.gguf_dequantize(dense, weight, ggml_type, is_interleaved(weight))
        out.copy_(F.linear(x, dense))
    else:
        ops.gguf_linear(out, x, weight, ggml_type, x.dtype == torch.bfloat16,
                        is_interleaved(weight))


class GGUFLinear(nn.Module):
    """A Linear (or fused MergedLinear) whose weight stays in llama.cpp's blocks."""

    def __init__(self, in_features: int, output_sizes: list[int], types: list[int], bias: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, sum(output_sizes)
        self.output_sizes = output_sizes
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.shard_types = types
        self.runs = weight_runs(output_sizes, types, in_features)
        self.uniform = len(self.runs) == 1
        shape = ((self.out_features, self.runs[0].row_bytes) if self.uniform
                 else (sum(r.rows * r.row_bytes for r in self.runs),))
        self.weight = frozen(torch.empty(shape, dtype=torch.uint8))
        self.bias = frozen(torch.empty(self.out_features, dtype=dtype)) if bias else None
        self.dtype = dtype  # the activations'
        self.use_kernels = True  # prepare_for_inference: the C++ kernels on CPU

    @property
    def ggml_type(self) -> int:
        if not self.uniform:
            raise AttributeError("a mixed-type layer has one ggml type per run")
        return self.runs[0].ggml_type

    def run_weight(self, run: WeightRun) -> torch.Tensor:
        """The run's packed rows, [rows, bytes_per_row] (a view of `weight`)."""
        if self.uniform:
            return self.weight
        flat = self.weight[run.byte_start : run.byte_start + run.rows * run.row_bytes]
        return flat.view(run.rows, run.row_bytes)

    def shard_weight(self, shard: int) -> torch.Tensor:
        start, size = self.offsets[shard], self.output_sizes[shard]
        run = next(r for r in self.runs if r.row_start <= start < r.row_start + r.rows)
        return self.run_weight(run)[start - run.row_start : start - run.row_start + size]

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        if param_name == "bias":
            start, size = self.offsets[shard], self.output_sizes[shard]
            target = self.bias[start : start + size]
        else:
            target = self.shard_weight(shard)
        if tensor.shape != target.shape or (param_name == "weight"
                                             and tensor.dtype != torch.uint8):
            raise ValueError(f"shard {shard} of {param_name} is {tensor.dtype} "
                             f"{tuple(tensor.shape)}, expected {target.dtype} "
                             f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # lean on purpose: a decode step calls this ~120 times for ~50 us of kernel time each,
        # so every PyTorch call saved here is a few percent of the step
        rows = (x if x.dim() == 2 else x.reshape(-1, self.in_features)).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=rows.dtype, device=rows.device)
        if self.uniform:
            gguf_matmul(out, rows, self.weight, self.runs[0].ggml_type, self.use_kernels)
        else:
            for run in self.runs:
                part = out[:, run.row_start : run.row_start + run.rows]
                gguf_matmul(part, rows, self.run_weight(run), run.ggml_type, self.use_kernels)
        if self.bias is not None:
            out += self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def prepare_for_inference(self) -> None:
        self.use_kernels = self.weight.device.type == "cpu" and cpu_ops() is not None
        if (self.use_kernels and self.dtype == torch.bfloat16 and self.uniform
                and self.ggml_type in INT8_TYPES and self.out_features % GROUP_ROWS == 0):
            interleave(self.weight, self.ggml_type)

    def extra_repr(self) -> str:
        types = "|".join(BLOCK_FORMATS[t].name for t in self.shard_types)
        return f"in_features={self.in_features}, out_features={self.out_features}, {types}"


class GGUFEmbedding(nn.Module):
    """A token embedding in llama.cpp's blocks: only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ggml_type: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.ggml_type, self.dtype = ggml_type, dtype
        row_bytes = BLOCK_FORMATS[ggml_type].row_bytes(embedding_dim)
        self.weight = frozen(torch.empty(num_embeddings, row_bytes, dtype=torch.uint8))
        self.use_kernels = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        if self.use_kernels:
            rows = torch.empty(ids.shape[0], self.embedding_dim, dtype=self.dtype)
            cpu_ops().gguf_dequantize(rows, self.weight, self.ggml_type,
                                      is_interleaved(self.weight), ids)
        else:
            rows = dequantize(self.weight.index_select(0, ids), self.ggml_type).to(self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def prepare_for_inference(self) -> None:
        self.use_kernels = self.weight.device.type == "cpu" and cpu_ops() is not None

    def extra_repr(self) -> str:
        name = BLOCK_FORMATS[self.ggml_type].name
        return f"{self.num_embeddings}, {self.embedding_dim}, {name}"


def fused_shard_names() -> dict[str, list[str]]:
    """Fused module name piece -> its checkpoint pieces in shard order (qkv_proj -> q, k, v)."""
    from pagedllm.model.llama import STACKED_PARAMS

    fused: dict[str, list[tuple[int, str]]] = {}
    for piece, (module, shard) in STACKED_PARAMS.items():
        fused.setdefault(module, []).append((shard, piece))
    return {module: [piece for _, piece in sorted(pieces)] for module, pieces in fused.items()}


class GGUFQuantization(QuantizationMethod):
    name = "gguf"

    def __init__(self, tensor_types: dict[str, int], tied_lm_head: bool = False) -> None:
        self.file_types = tensor_types  # HF weight name -> ggml type id, as the file stores them
        self.tensor_types = dict(tensor_types)
        if tied_lm_head:  # the lm_head shares the embedding's bytes (the loader ties them)
            self.tensor_types["lm_head.weight"] = tensor_types["model.embed_tokens.weight"]

    @classmethod
    def from_checkpoint(cls, hf_config: PretrainedConfig,
                        source: ModelSource) -> GGUFQuantization:
        from pagedllm.model.gguf_file import GGUFFile

        with GGUFFile(source.path) as gguf_file:
            types = gguf_file.tensor_types()
        unsupported = {t for t in types.values() if t not in BLOCK_FORMATS | FLOAT_TYPES}
        if unsupported:
            import gguf

            names = ", ".join(sorted(gguf.GGMLQuantizationType(t).name for t in unsupported))
            supported = ", ".join(f.name for f in BLOCK_FORMATS.values())
            raise ValueError(f"GGUF tensor types {names} cannot be served quantized "
                             f"(supported: {supported}); use quantization='none'")
        tied = getattr(hf_config, "tie_word_embeddings", False) and "lm_head.weight" not in types
        return cls(types, tied_lm_head=tied)

    def quantized_types(self, names: list[str]) -> list[int] | None:
        """The ggml types of these weights, None when all are float (or not in the file)."""
        types = [self.tensor_types.get(name) for name in names]
        quantized = [t in BLOCK_FORMATS for t in types]
        if not any(quantized):
            return None
        if not all(quantized):
            raise ValueError(f"weights {names} mix quantized and float GGUF types; a fused "
                             f"layer needs all of them quantized")
        return types

    def quantized_layer(self, prefix: str, layer: Linear,
                        dtype: torch.dtype) -> nn.Module | None:
        parent, _, piece = prefix.rpartition(".")
        pieces = fused_shard_names().get(piece) if isinstance(layer, MergedLinear) else None
        names = ([f"{parent}.{p}.weight" for p in pieces] if pieces else [f"{prefix}.weight"])
        types = self.quantized_types(names)
        if types is None:
            return None
        sizes = layer.output_sizes if pieces else [layer.out_features]
        return GGUFLinear(layer.in_features, sizes, types, layer.bias is not None, dtype)

    def quantize_model(self, model: nn.Module, dtype: torch.dtype) -> None:
        """The Linear layers (base class), then every quantized nn.Embedding."""
        super().quantize_model(model, dtype)
        for prefix, layer in list(model.named_modules()):
            if not isinstance(layer, nn.Embedding):
                continue
            types = self.quantized_types([f"{prefix}.weight"])
            if types is not None:
                parent_name, _, child = prefix.rpartition(".")
                replacement = GGUFEmbedding(layer.num_embeddings, layer.embedding_dim, types[0],
                                            dtype)
                setattr(model.get_submodule(parent_name), child, replacement)

    def describe(self) -> str:
        counts = Counter(FLOAT_TYPES.get(t) or BLOCK_FORMATS[t].name
                         for t in self.file_types.values())
        return "gguf (" + ", ".join(f"{n} x{c}" for n, c in counts.most_common()) + ")"
