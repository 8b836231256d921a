"""The layer every integer checkpoint format shares: its packed tensors as frozen parameters
under the checkpoint's names, fused projections filled shard by shard, and after loading one
repack into the run-time layout (int_weight.py) that forward uses.

A fused projection (q|k|v, gate|up) is one matrix of output_sizes rows at run time, but each
shard arrives as its own tensors; every format stores each tensor's output channels along some
dimension, sometimes packed several to a stored value:

    GPTQ  qweight [K/8, N]  scales [G, N]  qzeros [G, N/8]     output along dim 1
    AWQ   qweight [K, N/8]  scales [G, N]  qzeros [G, N/8]     output along dim 1
    compressed-tensors  weight_packed [N, K/8]  weight_scale [N, G]  weight_zero_point [N/8, G]
                                                                output along dim 0

so a shard lands at offset/pack along its tensor's output dimension (`output_dim`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from pagedllm.model.layers.linear import Linear
from pagedllm.model.layers.quantization.base import frozen
from pagedllm.model.layers.quantization.int_weight import IntWeight, int_linear


class PackedLinear(nn.Module, ABC):
    """Base class: subclasses register their checkpoint tensors in __init__ (`add`), say where
    each one keeps its output channels (`output_dim`) and unpack them (`repack`)."""

    def __init__(self, prefix: str, layer: Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.prefix = prefix  # the module path, to name a weight in an error
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.output_sizes = list(getattr(layer, "output_sizes", [layer.out_features]))
        self.offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.dtype = dtype
        self.checkpoint_names: list[str] = []
        self.int_weight: IntWeight | None = None  # set by prepare_for_inference
        if layer.bias is not None:
            self.add("bias", torch.empty(layer.out_features, dtype=dtype))
        else:
            self.bias = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.register_parameter(name, frozen(tensor))
        self.checkpoint_names.append(name)

    @property
    def fused(self) -> bool:
        return len(self.output_sizes) > 1

    @abstractmethod
    def output_dim(self, name: str) -> tuple[int, int]:
        """(dimension of tensor `name` that runs over output channels, channels per stored
        element along it)."""

    @abstractmethod
    def repack(self) -> IntWeight:
        """The loaded tensors in the run-time layout."""

    # ---- loading --------------------------------------------------------------------------
    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        dim, per = self.output_dim(param_name)
        start, size = self.offsets[shard], self.output_sizes[shard]
        if start % per or size % per:
            raise ValueError(f"{self.prefix}.{param_name}: shard {shard} ({size} outputs) does "
                             f"not split at a packed boundary of {per}")
        target = getattr(self, param_name).narrow(dim, start // per, size // per)
        self.check_shape(param_name, tensor, tuple(target.shape), shard)
        with torch.no_grad():
            target.copy_(tensor)

    def check_shape(self, name: str, tensor: torch.Tensor, expected: tuple,
                    shard: int | None = None) -> None:
        if tuple(tensor.shape) != expected:
            part = "" if shard is None else f" (shard {shard})"
            raise ValueError(f"weight {self.prefix}.{name}{part} has shape "
                             f"{tuple(tensor.shape)}, expected {expected}: {self.describe()}")

    def describe(self) -> str:
        """What the expected shapes follow from, for load errors (bits, group size...)."""
        return type(self).__name__

    # ---- run time -------------------------------------------------------------------------
    def prepare_for_inference(self) -> None:
        """Repack once; the checkpoint's tensors are then dropped so only one copy stays."""
        if self.int_weight is not None:
            return
        with torch.no_grad():
            self.int_weight = self.repack()
        for name in self.checkpoint_names:
            if name != "bias":
                delattr(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_linear(x, self.int_weight, self.bias)

    @property
    def weight_nbytes(self) -> int:
        return self.int_weight.nbytes if self.int_weight is not None else sum(
            getattr(self, n).nbytes for n in self.checkpoint_names if n != "bias")


def group_count(in_features: int, group_size: int) -> int:
    """Groups per row; group_size -1 (or 0) means one group over every input channel."""
    return 1 if group_size <= 0 else -(-in_features // group_size)


def check_bits(bits: int, allowed: tuple[int, ...], method: str) -> int:
    if bits not in allowed:
        raise ValueError(f"{method} checkpoints with bits={bits} are not supported; supported: "
                         f"{', '.join(map(str, allowed))}")
    return bits
