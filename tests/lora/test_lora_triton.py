"""The Triton LoRA kernels against the PyTorch path (interpreted on CPU without a GPU, as the
attention kernels' tests are: tests/conftest.py sets TRITON_INTERPRET=1 first)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.lora.triton_ops import lora_delta_triton  # noqa: E402
from pagedllm.model.layers.lora import BASE, LoRABatch, add_lora_delta  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no GPU, and TRITON_INTERPRET is not 1", allow_module_level=True)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("in_features, out_features", [(40, 72), (96, 24)])
def test_triton_delta_equals_the_torch_path(dtype, tolerance, in_features, out_features):
    """Slots of different used ranks (the rest zero, as set_slot leaves them), base rows
    among adapter rows, sizes that are not multiples of the tiles."""
    torch.manual_seed(0)
    slots, rank_rows = 3, 24
    lora_a = torch.zeros(slots, rank_rows, in_features, dtype=dtype, device=DEVICE)
    lora_b = torch.zeros(slots, rank_rows, out_features, dtype=dtype, device=DEVICE)
    used = [24, 5, 0]
    for slot, rows in enumerate(used):
        lora_a[slot, :rows] = torch.randn(rows, in_features, dtype=dtype, device=DEVICE)
        lora_b[slot, :rows] = torch.randn(rows, out_features, dtype=dtype, device=DEVICE) / 4
    row_slots = [0, BASE, 1, 1, 2, 0, BASE, 1]
    x = torch.randn(len(row_slots), in_features, dtype=dtype, device=DEVICE)
    base = torch.randn(len(row_slots), out_features, dtype=dtype, device=DEVICE)
    batch = LoRABatch.from_row_slots(row_slots, torch.device(DEVICE))
    expected = add_lora_delta(base.clone().float(), x.float(), lora_a.float(), lora_b.float(),
                              batch, used)
    got = lora_delta_triton(base.clone(), x, lora_a, lora_b, batch.slots)
    scale = expected.abs().max().item()
    assert (got.float() - expected).abs().max().item() <= tolerance * scale
    assert torch.equal(got[1], base[1]) and torch.equal(got[6], base[6])  # base rows untouched
