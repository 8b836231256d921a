"""The LoRA layer's batched delta against a plain per-row sum, and the slot bookkeeping."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.layers.linear import Linear
from pagedllm.model.layers.lora import BASE, FLOAT32_ROWS, LoRABatch, LoRAContext, LoRALinear

IN, OUT, SLOTS, MAX_RANK = 24, 40, 3, 8


def layer_with_slots(ranks: list[int], dtype=torch.float32) -> LoRALinear:
    torch.manual_seed(0)
    base = Linear(IN, OUT, bias=False).to(dtype)
    layer = LoRALinear(base, [("x_proj", 0, OUT)], SLOTS, MAX_RANK, LoRAContext(), dtype, "cpu")
    for slot, rank in enumerate(ranks):
        if rank:
            layer.set_slot(slot, torch.randn(rank, IN, dtype=dtype),
                           torch.randn(rank, OUT, dtype=dtype))
    return layer


def reference(layer: LoRALinear, x: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    out = layer.base(x)
    for row, slot in enumerate(row_slots):
        if slot != BASE:
            used = layer.slot_rows[slot]
            out[row] += x[row] @ layer.lora_a[slot, :used].T @ layer.lora_b[slot, :used]
    return out


@pytest.mark.parametrize("row_slots", [
    [0, 1, BASE, 2, 1, 0, BASE, 2, 2, 0],  # interleaved, with base rows
    [1, 1, 1, 1],  # one adapter for every row: no gather
    [0, 0, 1, 2, 2],  # every row under an adapter, already in slot order: no gather either
    [BASE, BASE],  # no adapter: the layer is the base layer
    [2, 2, 0, 0, 1],  # a slot whose adapter leaves the layer alone (rank 0 at slot 2)
])
def test_batched_delta_equals_the_per_row_sum(row_slots):
    layer = layer_with_slots([8, 3, 0] if 2 in row_slots and row_slots[0] == 2 else [8, 3, 5])
    x = torch.randn(len(row_slots), IN)
    layer.context.batch = LoRABatch.from_row_slots(row_slots, torch.device("cpu"))
    torch.testing.assert_close(layer(x), reference(layer, x, row_slots))


def test_batch_groups_rows_by_slot():
    batch = LoRABatch.from_row_slots([1, BASE, 0, 1, 0], torch.device("cpu"))
    assert batch.order.tolist() == [2, 4, 0, 3]
    assert [(s.slot, s.start, s.end) for s in batch.segments] == [(0, 0, 2), (1, 2, 4)]
    assert LoRABatch.from_row_slots([BASE, BASE], torch.device("cpu")) is None
    assert LoRABatch.from_row_slots([2, 2], torch.device("cpu")).order is None


def test_a_batch_of_another_size_runs_the_base_layer():
    layer = layer_with_slots([8, 3, 5])
    layer.context.batch = LoRABatch.from_row_slots([0, 1], torch.device("cpu"))
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), layer.base(x))


def test_set_slot_clears_what_was_there():
    layer = layer_with_slots([8, 3, 5])
    layer.set_slot(0, torch.ones(2, IN), torch.ones(2, OUT))
    assert layer.slot_rows[0] == 2 and not layer.lora_a[0, 2:].any()
    layer.set_slot(0, None, None)
    assert layer.slot_rows[0] == 0 and not layer.lora_a[0].any() and not layer.lora_b[0].any()


@pytest.mark.parametrize("num_rows", [12, FLOAT32_ROWS + 20])
def test_bf16_layers_take_the_float32_copy_for_small_steps(num_rows):
    """A bf16 layer on the CPU multiplies small steps with its float32 copy of the slots and
    larger ones in bf16: both give the float32 sum, to bf16's precision."""
    layer = layer_with_slots([8, 3, 5], dtype=torch.bfloat16)
    assert layer.lora_a32 is not None and torch.equal(layer.lora_a32, layer.lora_a.float())
    row_slots = [(i % 4) - 1 for i in range(num_rows)]
    x = torch.randn(num_rows, IN, dtype=torch.bfloat16)
    layer.context.batch = LoRABatch.from_row_slots(row_slots, torch.device("cpu"))
    got = layer(x).float()
    exact = layer.base(x).float()
    for row, slot in enumerate(row_slots):
        if slot != BASE:
            used = layer.slot_rows[slot]
            exact[row] += x[row].float() @ layer.lora_a32[slot, :used].T @ layer.lora_b32[slot, :used]
    torch.testing.assert_close(got, exact, atol=0.1, rtol=2e-2)


def test_only_the_llama_decoder_families_take_lora():
    from pagedllm.lora.model import wrap_model

    with pytest.raises(ValueError, match="Llama-decoder families"):
        wrap_model(torch.nn.Sequential(Linear(4, 4)), 1, 8, torch.float32, "cpu")
