"""LoRA layers: a projection plus the low-rank deltas of up to `max_loras` adapters, applied to
a flat batch where each token may run under a different adapter (or none).

Each layer holds every slot's matrices stacked, scaling folded into B:

    lora_a  [max_loras, slices * max_rank, in]      shrink: h = x @ A[slot].T
    lora_b  [max_loras, slices * max_rank, out]     expand: y = h @ B[slot]

A fused projection (q|k|v, gate|up) takes one adapter matrix per piece: the pieces an adapter
targets are packed one after another along the rank axis of its slot (piece i: rows
[i*r, (i+1)*r)), and B is block-diagonal, each piece's rows writing only that piece's output
columns; so one shrink and one expand serve every piece. `slot_rows[slot]` says how many rows
of the slot are in use (0: the adapter leaves this layer alone).

On the CPU one C++ call per layer adds every row's delta (csrc/lora.cpp: rows grouped by slot,
each group's A and B read once, float32 arithmetic); on CUDA one Triton shrink and one expand run
over every row, each reading its row's slot (lora/triton_ops.py). Rows of the base model cost
nothing. Without a compiler (and as the reference the kernels are tested against) the batch's
tokens are grouped by slot once per step (LoRABatch): the rows under an adapter are gathered
sorted by slot, each slot's run takes two matmuls, and one gather puts the deltas back in batch
order (base rows read a zero row); a Python loop runs over the slots of the step (at most
max_loras), never over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.ops.cpu import KERNEL_DTYPES, cpu_ops

BASE = -1  # the slot index of a row that runs the base model only


@dataclass(slots=True)
class LoRASegment:
    slot: int
    start: int  # rows [start, end) of the slot-sorted rows
    end: int


@dataclass(slots=True)
class LoRABatch:
    """One step's token -> slot assignment, shared by every LoRA layer of the model."""

    num_rows: int
    segments: list[LoRASegment]  # runs of one slot over the sorted adapter rows
    order: torch.Tensor | None  # adapter rows sorted by slot; None: every row, in order
    # [num_rows] each row's place among the sorted adapter rows, len(order) for a base row
    # (it reads the zero row appended to the deltas); None with `order`
    unsort: torch.Tensor | None
    slots: torch.Tensor  # [num_rows] each row's slot, BASE for none (the kernels' input)

    @property
    def num_adapter_rows(self) -> int:
        return self.segments[-1].end

    @classmethod
    def from_row_slots(cls, row_slots: list[int], device: torch.device) -> LoRABatch | None:
        """None when no row runs under an adapter."""
        order = sorted((i for i, s in enumerate(row_slots) if s != BASE), key=row_slots.__getitem__)
        if not order:
            return None
        segments: list[LoRASegment] = []
        for position, row in enumerate(order):
            slot = row_slots[row]
            if segments and segments[-1].slot == slot:
                segments[-1].end = position + 1
            else:
                segments.append(LoRASegment(slot, position, position + 1))
        slots = torch.tensor(row_slots, dtype=torch.long, device=device)
        if len(order) == len(row_slots) and order == sorted(order):
            return cls(len(row_slots), segments, None, None, slots)
        unsort = [len(order)] * len(row_slots)
        for position, row in enumerate(order):
            unsort[row] = position
        return cls(len(row_slots), segments, torch.tensor(order, device=device),
                   torch.tensor(unsort, device=device), slots)


class LoRAContext:
    """The step's LoRABatch, set by the worker's adapter manager before each forward pass and
    read by every LoRA layer (None: no adapter this step). The one piece of per-step state the
    layers see; it holds no request, only rows and slots."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class LoRALinear(nn.Module):
    """`base` (a Linear, MergedLinear or quantized layer) plus the slots' deltas."""

    def __init__(self, base: nn.Module, pieces: list[tuple[str, int, int]], max_loras: int,
                 max_rank: int, context: LoRAContext, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        """`pieces`: (adapter module name, first output column, width) of each piece an
        adapter may target, e.g. q_proj/k_proj/v_proj of a qkv_proj. `dtype`: the
        activations'."""
        super().__init__()
        self.base = base
        self.pieces = pieces
        self.max_rank = max_rank
        self.context = context
        self.in_features, self.out_features = base.in_features, base.out_features
        rows = len(pieces) * max_rank
        factory = dict(dtype=dtype, device=device)
        self.register_buffer("lora_a", torch.zeros(max_loras, rows, self.in_features, **factory),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, rows, self.out_features,
                                                   **factory), persistent=False)
        self.slot_rows = [0] * max_loras

    @property
    def output_sizes(self) -> list[int]:
        return self.base.output_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = self.context.batch
        if batch is None or x.shape[0] != batch.num_rows:
            return out  # no adapter runs (or a warm-up batch of another shape)
        if x.is_cuda:  # one shrink and one expand launch over every row (lora/triton_ops.py)
            from pagedllm.lora.triton_ops import lora_delta_triton

            return lora_delta_triton(out, x, self.lora_a, self.lora_b, batch.slots)
        ops = cpu_ops() if x.device.type == "cpu" and x.dtype in KERNEL_DTYPES else None
        if ops is not None and x.dim() == 2:
            ops.lora_delta(out, x, self.lora_a, self.lora_b, batch.slots, self.slot_rows)
            return out
        return add_lora_delta(out, x, self.lora_a, self.lora_b, batch, self.slot_rows)

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Load one adapter's packed matrices (a: [rows, in], b: [rows, out], scaling in b)
        into `slot`; None clears it."""
        rows = 0 if a is None else a.shape[0]
        for stacked, matrix in ((self.lora_a, a), (self.lora_b, b)):
            stacked[slot].zero_()
            if matrix is not None:
                stacked[slot, :rows].copy_(matrix)
        self.slot_rows[slot] = rows


def add_lora_delta(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, batch: LoRABatch, slot_rows: list[int]) -> torch.Tensor:
    """out[row] += x[row] @ A[slot].T @ B[slot] for every row under an adapter, in float32 as
    the C++ kernel computes, slot by slot over the rows sorted by slot (module docstring)."""
    if not any(slot_rows[segment.slot] for segment in batch.segments):
        return out  # no adapter of the step targets this layer
    rows = x if batch.order is None else x.index_select(0, batch.order)
    rows = rows.float()
    deltas = []
    for segment in batch.segments:
        used = slot_rows[segment.slot]
        if not used:  # this adapter leaves the layer alone
            deltas.append(rows.new_zeros(segment.end - segment.start, out.shape[1]))
            continue
        h = rows[segment.start:segment.end] @ lora_a[segment.slot, :used].float().T
        deltas.append(h @ lora_b[segment.slot, :used].float())
    if batch.order is None:  # every row is under an adapter, already sorted by slot
        return out.add_(deltas[0] if len(deltas) == 1 else torch.cat(deltas))
    deltas.append(rows.new_zeros(1, out.shape[1]))  # what the base rows read
    return out.add_(torch.cat(deltas).index_select(0, batch.unsort))
