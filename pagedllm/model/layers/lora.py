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

The batch's tokens are grouped by slot once per step (LoRABatch): the rows under an adapter
are gathered sorted by slot, each slot's run computes its delta with two matmuls, and one
index_add puts the deltas back. Rows of the base model cost nothing; a Python loop runs over
the slots of the step (at most max_loras), never over requests. On CUDA the same sum is one
Triton shrink and one expand over every row, each reading its row's slot (lora/triton_ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
    slots: torch.Tensor  # [num_rows] each row's slot, BASE for none (the Triton path)

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
        identity = len(order) == len(row_slots) and order == sorted(order)
        index = None if identity else torch.tensor(order, dtype=torch.long, device=device)
        slots = torch.tensor(row_slots, dtype=torch.long, device=device)
        return cls(len(row_slots), segments, index, slots)


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
        return add_lora_delta(out, x, self.lora_a, self.lora_b, batch, self.slot_rows)

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Load one adapter's packed matrices (a: [rows, in], b: [rows, out], scaling in b)
        into `slot`; None clears it."""
        rows = 0 if a is None else a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is not None:
            self.lora_a[slot, :rows].copy_(a)
            self.lora_b[slot, :rows].copy_(b)
        self.slot_rows[slot] = rows


def add_lora_delta(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, batch: LoRABatch, slot_rows: list[int]) -> torch.Tensor:
    """out[row] += x[row] @ A[slot].T @ B[slot] for every row under an adapter, slot by slot
    over the rows sorted by slot (see the module docstring)."""
    rows = x if batch.order is None else x.index_select(0, batch.order)
    delta = None
    for segment in batch.segments:
        used = slot_rows[segment.slot]
        if not used:
            continue
        if delta is None:  # zeros: a slot that leaves this layer alone adds nothing
            delta = out.new_zeros(rows.shape[0], out.shape[1])
        h = rows[segment.start:segment.end] @ lora_a[segment.slot, :used].T
        torch.addmm(delta[segment.start:segment.end], h, lora_b[segment.slot, :used],
                    out=delta[segment.start:segment.end])
    if delta is None:
        return out
    if batch.order is None:
        return out.add_(delta)
    return out.index_add_(0, batch.order, delta)

