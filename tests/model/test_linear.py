"""Packed (oneDNN) CPU weights compute the same products as the plain layout."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.layers.linear import Linear, MergedLinear, prepare_for_inference


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_packed_bf16_linear_matches_plain(rows):
    torch.manual_seed(0)
    layer = Linear(96, 160, bias=True).bfloat16()
    x = torch.randn(rows, 96).bfloat16()
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.prepare_for_inference()
    assert layer.packed_weight is not None
    torch.testing.assert_close(layer(x), expected, atol=1e-2, rtol=1e-2)


def test_float32_and_merged_layers_keep_the_plain_path():
    model = torch.nn.Sequential(Linear(8, 8), MergedLinear(8, [4, 4]).bfloat16())
    prepare_for_inference(model)
    assert model[0].packed_weight is None  # float32: PyTorch's own matmul is used
    expected_packed = torch.backends.mkldnn.is_available()
    assert (model[1].packed_weight is not None) == expected_packed
