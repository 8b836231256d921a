"""The integer-weight layout (model/layers/quantization/int_weight.py) and the C++ kernel on it
(csrc/int_linear.cpp), at every ISA level this CPU runs, against the definition
w = (q - zero) * scale computed in PyTorch."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.layers.quantization.int_weight import (
    dequantize,
    int_linear,
    pack_int_weight,
    unpack_codes,
    unpack_int32,
)


def random_weight(n: int, k: int, bits: int, group_size: int, seed: int = 0, g_idx=None,
                  scale_dtype: torch.dtype = torch.float32):
    """scale_dtype: the checkpoint's scales are values of this type (given to packing as
    float32, as formats that widen them do)."""
    generator = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=generator)
    scales = (torch.rand(n, groups, generator=generator) * 0.02 + 0.001).to(scale_dtype).float()
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=generator).to(torch.uint8)
    return codes, scales, zeros, pack_int_weight(codes, scales, zeros, bits, group_size, g_idx)


def reference_weight(codes, scales, zeros, group_size, g_idx=None) -> torch.Tensor:
    """The float weight straight from the definition, in the checkpoint's channel order."""
    k = codes.shape[1]
    group = g_idx.long() if g_idx is not None else torch.arange(k) // group_size
    return (codes.float() - zeros[:, group].float()) * scales[:, group]


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_round_trip_through_the_packing(bits):
    codes, _, _, weight = random_weight(24, 96, bits, 32)
    assert weight.qweight.dtype == torch.uint8
    assert weight.qweight.shape == (24, 96 * bits // 8)  # packed: bits / 8 bytes per weight
    assert torch.equal(unpack_codes(weight).long(), codes)


def test_unpack_int32_is_least_significant_first():
    packed = torch.tensor([[0x76543210, 0x0000000F]], dtype=torch.int32)
    assert unpack_int32(packed, 4, dim=1).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7,
                                                         15, 0, 0, 0, 0, 0, 0, 0]]
    negative = torch.tensor([[-1]], dtype=torch.int32)  # the sign bit is a code bit, not a sign
    assert unpack_int32(negative, 8, dim=1).tolist() == [[255, 255, 255, 255]]


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 64), (4, 128), (8, 32), (8, 128)])
@pytest.mark.parametrize("rows", [1, 3, 7, 40])  # passes of the decode path; the GEMM path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_the_definition(ops, bits, group_size, rows, dtype, scale_dtype):
    n, k = 72, 256
    codes, scales, zeros, weight = random_weight(n, k, bits, group_size, scale_dtype=scale_dtype)
    # kept in a type as narrow as the checkpoint's (these bf16 values are fp16 values too)
    assert weight.scales.element_size() == scale_dtype.itemsize
    expected_weight = reference_weight(codes, scales, zeros, group_size)
    assert torch.equal(ops.int_dequantize(weight.qweight, weight.scales, weight.zeros, bits,
                                          group_size), expected_weight)
    x = torch.randn(rows, k).to(dtype)
    out = torch.empty(rows, n, dtype=dtype)
    ops.int_linear(out, x, weight.qweight, weight.scales, weight.zeros, bits, group_size)
    expected = x.float() @ expected_weight.T
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance * expected.abs().max(),
                               rtol=tolerance)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_act_order_permutes_the_input(monkeypatch, use_kernels):
    """desc_act: groups given out of channel order by g_idx; the layer sorts the channels by
    group and permutes x to match, so the product is the checkpoint's own."""
    if not use_kernels:
        monkeypatch.setattr("pagedllm.model.layers.quantization.int_weight.kernels_for",
                            lambda *tensors: None)
    k, group_size = 128, 32
    g_idx = (torch.randperm(k, generator=torch.Generator().manual_seed(1)) // group_size)
    codes, scales, zeros, weight = random_weight(40, k, 4, group_size, g_idx=g_idx)
    assert weight.perm is not None
    x = torch.randn(5, k)
    bias = torch.randn(40)
    expected = x @ reference_weight(codes, scales, zeros, group_size, g_idx).T + bias
    torch.testing.assert_close(int_linear(x, weight, bias), expected, atol=1e-4, rtol=1e-4)


def test_the_pytorch_path_handles_groups_the_kernel_cannot():
    """group_size 16 (blocks of 32 would straddle groups) and K not a multiple of 32."""
    codes, scales, zeros, weight = random_weight(8, 48, 4, 16)
    assert not weight.kernel_runs
    x = torch.randn(3, 48)
    expected = x @ reference_weight(codes, scales, zeros, 16).T
    torch.testing.assert_close(int_linear(x, weight, None), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(dequantize(weight, torch.float32), reference_weight(codes, scales, zeros,
                                                                           16))


def test_unsupported_bits_and_inconsistent_groups_are_value_errors():
    codes = torch.zeros(4, 64, dtype=torch.long)
    with pytest.raises(ValueError, match="3-bit"):
        pack_int_weight(codes, torch.ones(4, 2), torch.zeros(4, 2), 3, 32)
    with pytest.raises(ValueError, match=r"\[4, 2\]"):
        pack_int_weight(codes, torch.ones(4, 1), torch.zeros(4, 1), 4, 32)
    uneven = torch.zeros(64, dtype=torch.int32)  # every channel in group 0
    with pytest.raises(ValueError, match="g_idx"):
        pack_int_weight(codes, torch.ones(4, 2), torch.zeros(4, 2), 4, 32, g_idx=uneven)
    with pytest.raises(ValueError, match="zero points"):
        pack_int_weight(codes, torch.ones(4, 2), torch.full((4, 2), 256), 8, 32)
