"""The LoRA layer's batched delta against a plain per-row sum, and the slot bookkeeping."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.layers import lora as lora_layers
from pagedllm.model.layers.linear import Linear
from pagedllm.model.layers.lora import BASE, LoRABatch, LoRAContext, LoRALinear

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
@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "pytorch"])
def test_batched_delta_equals_the_per_row_sum(row_slots, kernels, monkeypatch):
    """Through the C++ kernel, and through the PyTorch path a machine without a compiler takes."""
    if not kernels:
        monkeypatch.setattr(lora_layers, "cpu_ops", lambda: None)
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


def test_bf16_layers_add_the_float32_delta_rounded_once():
    """A bf16 layer adds the delta computed in float32 from its bf16 slots, rounded once."""
    layer = layer_with_slots([8, 3, 5], dtype=torch.bfloat16)
    row_slots = [(i % 4) - 1 for i in range(30)]
    x = torch.randn(len(row_slots), IN, dtype=torch.bfloat16)
    layer.context.batch = LoRABatch.from_row_slots(row_slots, torch.device("cpu"))
    got = layer(x)
    exact = layer.base(x).float()
    for row, slot in enumerate(row_slots):
        if slot != BASE:
            used = layer.slot_rows[slot]
            a, b = layer.lora_a[slot, :used].float(), layer.lora_b[slot, :used].float()
            exact[row] += x[row].float() @ a.T @ b
    torch.testing.assert_close(got, exact.to(torch.bfloat16), atol=0.05, rtol=1e-2)


def test_only_the_llama_decoder_families_take_lora():
    from pagedllm.lora.model import wrap_model

    with pytest.raises(ValueError, match="Llama-decoder families"):
        wrap_model(torch.nn.Sequential(Linear(4, 4)), 1, 8, torch.float32, "cpu")
