"""bf16 CPU weights: oneDNN's packed layout where the CPU runs bf16, float32 arithmetic on the
bf16 weight elsewhere; both compute the products of the plain layout."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.layers.linear import Linear, MergedLinear, prepare_for_inference
from pagedllm.platform.cpu import cpu_info


def float32_reference(x, weight, bias):
    """A bf16 GEMM with float32 accumulation: products and sums in float32, one rounding."""
    return torch.nn.functional.linear(x.float(), weight.float(),
                                      None if bias is None else bias.float()).bfloat16()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_packed_bf16_linear_matches_plain(rows):
    if not cpu_info().onednn_bf16:
        pytest.skip("oneDNN cannot pack bf16 weights on this CPU")
    torch.manual_seed(0)
    layer = Linear(96, 160, bias=True).bfloat16()
    x = torch.randn(rows, 96).bfloat16()
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.prepare_for_inference()
    assert layer.packed_weight is not None
    torch.testing.assert_close(layer(x), expected, atol=1e-2, rtol=1e-2)


# 1-31 rows take the weight-streaming path (passes of up to 8 rows), 32 and more the GEMM
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 31, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_kernel_computes_in_float32(ops, rows, bias):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 100, generator=generator).bfloat16()  # 100: a tail past the vectors
    weight = torch.randn(70, 100, generator=generator).bfloat16()
    b = torch.randn(70, generator=generator).bfloat16() if bias else None
    out = torch.empty(rows, 70, dtype=torch.bfloat16)
    ops.bf16_linear(out, x, weight, b)
    # the sums' order differs from PyTorch's: at most one bf16 ulp apart
    torch.testing.assert_close(out, float32_reference(x, weight, b), atol=1e-2, rtol=8e-3)


def test_bf16_linear_kernel_rejects_bad_inputs(ops):
    x, weight = torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.bf16_linear(torch.empty(2, 4), x.float(), weight.float())
    with pytest.raises(RuntimeError, match="input has 6 features, weight expects 8"):
        ops.bf16_linear(torch.empty(2, 4, dtype=torch.bfloat16), x[:, :6].contiguous(), weight)


def test_without_onednn_bf16_the_weight_stays_bf16_and_computes_in_float32(force_cpu_isa):
    force_cpu_isa("avx2")
    torch.manual_seed(0)
    layer = Linear(96, 160, bias=True).bfloat16()
    layer.prepare_for_inference()
    assert layer.packed_weight is None and layer.float32_compute
    assert layer.weight.dtype == torch.bfloat16  # half the bytes of a float32 copy
    for rows in (1, 5, 40):
        x = torch.randn(2, rows, 96).bfloat16()  # leading dims are kept
        out = layer(x)
        assert out.shape == (2, rows, 160) and out.dtype == torch.bfloat16
        expected = float32_reference(x.view(-1, 96), layer.weight, layer.bias).view(2, rows, 160)
        torch.testing.assert_close(out, expected, atol=1e-2, rtol=8e-3)


def test_float32_and_merged_layers_keep_the_plain_path():
    model = torch.nn.Sequential(Linear(8, 8), MergedLinear(8, [4, 4]).bfloat16())
    prepare_for_inference(model)
    assert model[0].packed_weight is None and not model[0].float32_compute  # PyTorch's matmul
    packed = torch.backends.mkldnn.is_available() and cpu_info().onednn_bf16
    assert (model[1].packed_weight is not None) == packed
    assert model[1].float32_compute == (not packed)
