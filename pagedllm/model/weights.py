"""Copying checkpoint tensors into a model's parameters, with the checks every family needs."""

from __future__ import annotations

import torch
from torch import nn


def copy_checked(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> None:
    """params[name] <- tensor; a name the model lacks or a wrong shape is a ValueError."""
    if name not in params:
        raise ValueError(f"checkpoint has an unexpected weight {name!r}")
    param = params[name]
    if param.shape != tensor.shape:
        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
