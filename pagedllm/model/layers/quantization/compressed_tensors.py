"""compressed-tensors checkpoints (what llm-compressor writes), served with weights that stay
quantized.

config.json's quantization_config names scheme groups, each with `targets` (a layer class such
as "Linear", a module name, or "re:<regex>"), its weight and input-activation arguments and a
storage `format`; `ignore` lists layers left float (usually lm_head). Per layer, K input and N
output channels:

    pack-quantized   W4A16 / W8A16 (int weights, float activations)
        weight_packed      int32 [N, K * bits / 32]  codes + 2**(bits-1), LSB first along K
        weight_scale       [N, G]                    G = K / group_size, 1 per channel
        weight_zero_point  int32 [N * bits / 32, G]  asymmetric only; packed along N
        weight_shape       int64 [2]                 (N, K)
        weight_g_idx       int32 [K]                 actorder "group" only: each channel's group
    int-quantized    W8A8: weight int8 [N, K], weight_scale [N, 1] (or [N, G], or [1] per
                     tensor), optional weight_zero_point; activations quantized to int8 per
                     token at run time (dynamic)
    float-quantized  FP8 / FP8_DYNAMIC: weight float8_e4m3fn [N, K], weight_scale [N, 1] or [1];
                     activations, when the scheme quantizes them, to fp8 per token (dynamic)

    w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]

Int weights are repacked into int_weight.py's layout (the C++ kernel on CPU). FP8 weights stay
float8 and are widened a tile of rows at a time to the activation dtype for each product.
Static activation scales, sparsity, transforms, block-wise and FP4 schemes are refused with a
ValueError naming what is unsupported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pagedllm.logger import init_logger
from pagedllm.model.layers.linear import Linear
from pagedllm.model.layers.quantization.base import QuantizationMethod
from pagedllm.model.layers.quantization.gptq import quantization_config
from pagedllm.model.layers.quantization.int_weight import (
    IntWeight,
    int_linear,
    pack_int_weight,
    unpack_int32,
)
from pagedllm.model.layers.quantization.packed_linear import PackedLinear
from pagedllm.model.llama import STACKED_PARAMS
from pagedllm.model.source import ModelSource

logger = init_logger(__name__)

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
FP8_TILE_ELEMENTS = 1 << 22  # fp8 weights widened per product: at most 4M elements at once
INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")


@dataclass(frozen=True, slots=True)
class Scheme:
    """One config group, checked: what a layer it targets stores and how it runs."""
    format: str
    weight_type: str  # "int" or "float"
    bits: int
    strategy: str  # "channel", "group" or "tensor"
    group_size: int | None
    symmetric: bool
    actorder: bool  # weight_g_idx stored
    activations: str | None  # None (weight-only), "int8" or "fp8": quantized per token

    @classmethod
    def parse(cls, name: str, group: dict, default_format: str | None) -> Scheme:
        weights = group.get("weights") or {}
        fmt = str(group.get("format") or default_format or "")
        if not weights:
            raise ValueError(f"compressed-tensors group {name!r} quantizes no weights")
        scheme = cls(format=fmt, weight_type=str(weights.get("type", "int")),
                     bits=int(weights.get("num_bits", 8)),
                     strategy=str(weights.get("strategy", "tensor")),
                     group_size=weights.get("group_size"),
                     symmetric=bool(weights.get("symmetric", True)),
                     actorder=weights.get("actorder") == "group",
                     activations=parse_activations(name, group.get("input_activations")))
        scheme.check(name, weights)
        return scheme

    def check(self, name: str, weights: dict) -> None:
        def refuse(what: str) -> None:
            raise ValueError(f"compressed-tensors group {name!r}: {what} is not supported; "
                             f"supported: pack-quantized W4A16/W8A16, int-quantized W8A8 "
                             f"(dynamic per-token activations), float-quantized FP8 weights "
                             f"(per channel or tensor, dynamic activations)")

        if weights.get("dynamic"):
            refuse("dynamic weight quantization")
        if self.format in INT_FORMATS and self.weight_type == "int":
            allowed_bits = (4, 8) if self.format == "pack-quantized" else (8,)
            if self.bits not in allowed_bits:
                refuse(f"{self.bits}-bit {self.format} weights")
            if self.format == "pack-quantized" and self.activations:
                refuse("activation quantization on pack-quantized weights")
            if self.strategy not in ("channel", "group", "tensor"):
                refuse(f"weight strategy {self.strategy!r}")
            if self.format == "pack-quantized" and self.strategy == "tensor":
                refuse("per-tensor pack-quantized weights")
            if self.strategy == "group" and not self.group_size:
                refuse("group strategy without group_size")
        elif self.format == "float-quantized" and self.weight_type == "float":
            if self.bits != 8 or self.strategy not in ("channel", "tensor"):
                refuse(f"{self.bits}-bit float weights with strategy {self.strategy!r}")
            if self.activations == "int8":
                refuse("fp8 weights with int8 activations")
        else:
            refuse(f"format {self.format!r} with {self.weight_type} weights")


def parse_activations(name: str, args: dict | None) -> str | None:
    if not args:
        return None
    kind = "int8" if args.get("type", "int") == "int" else "fp8"
    if int(args.get("num_bits", 8)) != 8 or not args.get("dynamic") or \
            args.get("strategy") != "token" or not args.get("symmetric", True):
        raise ValueError(f"compressed-tensors group {name!r}: input activations {args} are not "
                         f"supported; only dynamic symmetric per-token 8-bit ones are")
    return kind


class CompressedTensorsQuantization(QuantizationMethod):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], Scheme]], ignore: list[str]) -> None:
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def from_checkpoint(cls, hf_config: PretrainedConfig,
                        source: ModelSource) -> CompressedTensorsQuantization:
        config = quantization_config(hf_config)
        for key in ("sparsity_config", "transform_config"):
            if config.get(key):
                raise ValueError(f"compressed-tensors {key} is not supported")
        status = config.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"compressed-tensors quantization_status {status!r} is not "
                             f"supported; save the model compressed")
        if config.get("kv_cache_scheme"):
            logger.warning("compressed-tensors kv_cache_scheme ignored: use kv_cache_dtype")
        groups = [(list(group.get("targets") or []), Scheme.parse(name, group, config.get("format")))
                  for name, group in (config.get("config_groups") or {}).items()]
        return cls(groups, list(config.get("ignore") or []))

    def quantized_layer(self, prefix: str, layer: Linear, dtype: torch.dtype) -> nn.Module | None:
        schemes = {self.scheme_for(name) for name in checkpoint_names(prefix, layer)}
        if len(schemes) > 1:
            raise ValueError(f"{prefix}: its fused projections are quantized differently")
        scheme = schemes.pop()
        if scheme is None:
            return None
        if scheme.format == "pack-quantized":
            return PackedIntLinear(prefix, layer, dtype, scheme)
        if scheme.weight_type == "int":
            return Int8Linear(prefix, layer, dtype, scheme)
        return Fp8Linear(prefix, layer, dtype, scheme)

    def scheme_for(self, name: str) -> Scheme | None:
        if any(matches(pattern, name) for pattern in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(matches(pattern, name) for pattern in targets):
                return scheme
        return None

    def describe(self) -> str:
        schemes = ", ".join(f"{s.format} {s.weight_type}{s.bits} {s.strategy}"
                            f"{f' g{s.group_size}' if s.strategy == 'group' else ''}"
                            f"{f' + {s.activations} activations' if s.activations else ''}"
                            for _, s in self.groups)
        return f"compressed-tensors ({schemes}; float: {', '.join(self.ignore) or 'none'})"


def checkpoint_names(prefix: str, layer: Linear) -> list[str]:
    """The checkpoint's module names for one of our layers: a fused q|k|v or gate|up is one per
    projection (model.layers.0.self_attn.q_proj, ...)."""
    parent, _, child = prefix.rpartition(".")
    pieces = [piece for piece, (fused, _) in STACKED_PARAMS.items() if fused == child]
    if not pieces or len(pieces) != len(getattr(layer, "output_sizes", [])):
        return [prefix]
    return [f"{parent}.{piece}" if parent else piece for piece in pieces]


def matches(pattern: str, name: str) -> bool:
    """A target or ignore entry: "re:<regex>", a layer class ("Linear"), or a module name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == "Linear" or name == pattern or name.endswith(f".{pattern}")


# ---- layers -------------------------------------------------------------------------------
class CompressedLinear(PackedLinear):
    """What the three storage formats share: weight_scale's layout, weight_shape, activations."""

    def __init__(self, prefix: str, layer: Linear, dtype: torch.dtype, scheme: Scheme) -> None:
        super().__init__(prefix, layer, dtype)
        self.scheme = scheme
        k_dim = self.in_features
        self.group_size = scheme.group_size if scheme.strategy == "group" else k_dim
        self.groups = -(-k_dim // self.group_size)
        self.loaded_shards: dict[str, set[int]] = {}

    def scale_shape(self) -> tuple[int, ...]:
        if self.scheme.strategy == "tensor":  # one scale per projection
            return (len(self.output_sizes),) if self.fused else (1,)
        return (self.out_features, self.groups)

    def output_dim(self, name: str) -> tuple[int, int]:
        return 0, 1

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        if param_name in ("weight_scale", "weight_zero_point") and self.scheme.strategy == "tensor":
            self.check_shape(param_name, tensor.reshape(-1), (1,), shard)
            with torch.no_grad():
                getattr(self, param_name)[shard].copy_(tensor.reshape(()))
            return
        if param_name == "weight_g_idx":
            self.check_shape(param_name, tensor, (self.in_features,), shard)
            if self.loaded_shards.get(param_name) and not torch.equal(
                    self.weight_g_idx, tensor.to(self.weight_g_idx.dtype)):
                raise ValueError(f"{self.prefix}: the fused projections' weight_g_idx differ")
            self.loaded_shards.setdefault(param_name, set()).add(shard)
            with torch.no_grad():
                self.weight_g_idx.copy_(tensor)
            return
        super().load_shard(param_name, shard, tensor)

    def row_values(self, tensor: torch.Tensor) -> torch.Tensor:
        """weight_scale / weight_zero_point as [N, groups] floats, whatever the strategy."""
        if self.scheme.strategy == "tensor":
            sizes = torch.tensor(self.output_sizes, device=tensor.device)
            return tensor.float().reshape(-1).repeat_interleave(sizes).unsqueeze(1)
        return tensor.float()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the scheme's dynamic per-token activations see it (quantized, then widened)."""
        kind = self.scheme.activations
        if kind is None:
            return x
        amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
        if kind == "int8":
            scale = amax / 127.0
            return ((x.float() / scale).round().clamp(-128, 127) * scale).to(x.dtype)
        scale = amax / FP8_MAX
        codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return (codes.float() * scale).to(x.dtype)

    def describe(self) -> str:
        s = self.scheme
        return (f"compressed-tensors {s.format} {s.weight_type}{s.bits} {s.strategy}"
                f"{f' group_size {s.group_size}' if s.strategy == 'group' else ''}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_linear(self.quantize_input(x), self.int_weight, self.bias)


class PackedIntLinear(CompressedLinear):
    """pack-quantized: 4- or 8-bit codes packed into int32 along K."""

    def __init__(self, prefix: str, layer: Linear, dtype: torch.dtype, scheme: Scheme) -> None:
        super().__init__(prefix, layer, dtype, scheme)
        self.pack = 32 // scheme.bits
        k_dim, n_dim = self.in_features, self.out_features
        self.add("weight_packed", torch.empty(n_dim, -(-k_dim // self.pack), dtype=torch.int32))
        self.add("weight_scale", torch.empty(self.scale_shape(), dtype=torch.float32))
        shape_rows = (len(self.output_sizes), 2) if self.fused else (2,)
        self.add("weight_shape", torch.empty(shape_rows, dtype=torch.int64))
        if not scheme.symmetric:
            if n_dim % self.pack:
                raise ValueError(f"{prefix}: {n_dim} outputs do not pack zero points")
            self.add("weight_zero_point",
                     torch.empty(n_dim // self.pack, self.groups, dtype=torch.int32))
        if scheme.actorder:
            self.add("weight_g_idx", torch.empty(k_dim, dtype=torch.int32))

    def output_dim(self, name: str) -> tuple[int, int]:
        return 0, (self.pack if name == "weight_zero_point" else 1)

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        if param_name == "weight_shape":
            with torch.no_grad():
                self.weight_shape[shard].copy_(tensor)
            return
        super().load_shard(param_name, shard, tensor)

    def repack(self) -> IntWeight:
        bits, k_dim = self.scheme.bits, self.in_features
        self.check_weight_shape()
        codes = unpack_int32(self.weight_packed, bits, dim=1)[:, :k_dim]
        offset = 1 << (bits - 1)  # codes are stored shifted up by it, zero points too
        if self.scheme.symmetric:
            zeros = torch.full((self.out_features, self.groups), offset, device=codes.device)
        else:
            zeros = unpack_int32(self.weight_zero_point, bits, dim=0).float()
        g_idx = self.weight_g_idx if self.scheme.actorder else None
        return pack_int_weight(codes, self.row_values(self.weight_scale), zeros, bits,
                               self.group_size, g_idx=g_idx)

    def check_weight_shape(self) -> None:
        stored = self.weight_shape.reshape(-1, 2).tolist()
        expected = [[size, self.in_features] for size in self.output_sizes]
        if stored != expected:
            raise ValueError(f"weight {self.prefix}.weight_shape is {stored}, expected {expected}")


class Int8Linear(CompressedLinear):
    """int-quantized: int8 weights as they are, W8A8 when activations are quantized too."""

    def __init__(self, prefix: str, layer: Linear, dtype: torch.dtype, scheme: Scheme) -> None:
        super().__init__(prefix, layer, dtype, scheme)
        self.add("weight", torch.empty(self.out_features, self.in_features, dtype=torch.int8))
        self.add("weight_scale", torch.empty(self.scale_shape(), dtype=torch.float32))
        if not scheme.symmetric:
            self.add("weight_zero_point", torch.empty(self.scale_shape(), dtype=torch.int32))

    def repack(self) -> IntWeight:
        codes = self.weight.to(torch.int32) + 128  # int8 -> the unsigned codes of the layout
        zeros = torch.full((self.out_features, self.groups), 128.0, device=codes.device)
        if not self.scheme.symmetric:
            zeros = zeros + self.row_values(self.weight_zero_point)
        return pack_int_weight(codes, self.row_values(self.weight_scale), zeros, 8,
                               self.group_size)


class Fp8Linear(CompressedLinear):
    """float-quantized: float8_e4m3fn weights, widened a tile of rows at a time."""

    def __init__(self, prefix: str, layer: Linear, dtype: torch.dtype, scheme: Scheme) -> None:
        super().__init__(prefix, layer, dtype, scheme)
        self.add("weight", torch.empty(self.out_features, self.in_features,
                                       dtype=torch.float8_e4m3fn))
        self.add("weight_scale", torch.empty(self.scale_shape(), dtype=torch.float32))
        self.row_scales: torch.Tensor | None = None

    def prepare_for_inference(self) -> None:
        self.row_scales = self.row_values(self.weight_scale).reshape(-1).contiguous()

    def repack(self) -> IntWeight:
        raise NotImplementedError("fp8 weights are not repacked")

    @property
    def weight_nbytes(self) -> int:
        return self.weight.nbytes + self.weight_scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        rows = x.reshape(-1, self.in_features)
        out = rows.new_empty(rows.shape[0], self.out_features)
        step = max(1, FP8_TILE_ELEMENTS // self.in_features)
        for n0 in range(0, self.out_features, step):
            tile = self.weight[n0 : n0 + step].to(torch.float32) * self.row_scales[n0 : n0 + step,
                                                                                   None]
            out[:, n0 : n0 + step] = F.linear(rows, tile.to(rows.dtype))
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)
