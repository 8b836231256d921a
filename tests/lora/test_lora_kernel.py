"""The C++ lora_delta kernel at every ISA level against the float32 per-row sum."""

from __future__ import annotations

import pytest
import torch


def per_row_sum(out, x, lora_a, lora_b, row_slots, slot_rows):
    expected = out.float().clone()
    for row, slot in enumerate(row_slots.tolist()):
        if slot >= 0 and slot_rows[slot]:
            used = slot_rows[slot]
            a, b = lora_a[slot, :used].float(), lora_b[slot, :used].float()
            expected[row] += x[row].float() @ a.T @ b
    return expected


def problem(rows: int, k: int, n: int, dtype: torch.dtype, slot_rows: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rank = max(slot_rows)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    lora_a = torch.randn(len(slot_rows), rank, k, generator=generator).to(dtype)
    lora_b = torch.randn(len(slot_rows), rank, n, generator=generator).to(dtype)
    # slots in a scattered order, a few rows of the base model (-1)
    row_slots = torch.randint(-1, len(slot_rows), (rows,), generator=generator)
    out = torch.randn(rows, n, generator=generator).to(dtype)
    return out, x, lora_a, lora_b, row_slots, slot_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n", [
    (1, 16, 32),  # one decode row
    (27, 40, 72),  # a few passes per slot; feature counts off the vector width (tails)
    (300, 96, 160),  # enough work for more than one thread
])
def test_kernel_equals_the_per_row_sum(ops, dtype, rows, k, n):
    out, x, lora_a, lora_b, row_slots, slot_rows = problem(rows, k, n, dtype, [12, 0, 5, 16])
    expected = per_row_sum(out, x, lora_a, lora_b, row_slots, slot_rows)
    ops.lora_delta(out, x, lora_a, lora_b, row_slots, slot_rows)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    else:  # rounded once from the float32 sum: within one bf16 step of it
        torch.testing.assert_close(out, expected.to(dtype), atol=0.1, rtol=8e-3)


def test_kernel_writes_a_column_slice_and_leaves_the_rest(ops):
    """out may be a strided view (one piece of a fused output); base rows stay untouched."""
    full = torch.randn(10, 50)
    out = full[:, 8:40]
    _, x, lora_a, lora_b, row_slots, slot_rows = problem(10, 24, 32, torch.float32, [4, 6])
    row_slots[0] = -1
    before = full.clone()
    expected = per_row_sum(out, x, lora_a, lora_b, row_slots, slot_rows)
    ops.lora_delta(out, x, lora_a, lora_b, row_slots, slot_rows)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(full[:, :8], before[:, :8]) and torch.equal(full[:, 40:], before[:, 40:])
    assert torch.equal(full[0], before[0])


@pytest.mark.parametrize("change,match", [
    (lambda p: {**p, "row_slots": torch.tensor([0, 5, 1])}, "names slot 5"),
    (lambda p: {**p, "slot_rows": [4]}, "slot_rows must give"),
    (lambda p: {**p, "slot_rows": [4, 9]}, "uses 9 rows"),
    (lambda p: {**p, "x": p["x"].to(torch.bfloat16)}, "share a dtype"),
    (lambda p: {**p, "x": torch.randn(3, 7)}, "features"),
    (lambda p: {**p, "row_slots": torch.tensor([0, 1])}, "row_slots must be"),
])
def test_kernel_rejects_bad_inputs(ops, change, match):
    out, x, lora_a, lora_b, row_slots, slot_rows = problem(3, 8, 8, torch.float32, [4, 4])
    args = change(dict(out=out, x=x, lora_a=lora_a, lora_b=lora_b, row_slots=row_slots,
                       slot_rows=slot_rows))
    with pytest.raises(RuntimeError, match=match):
        ops.lora_delta(**args)
