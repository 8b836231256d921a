"""Random weights for load_format="dummy": a model of real shape from its config.json alone.

Benchmarks need the shapes of a 1-8 B model (the bytes each step reads, the matmul sizes), not
its knowledge, and downloading the checkpoint is not always possible. So, as vLLM does, every
weight is drawn uniformly from a small interval: logits stay finite and close together, and the
work per token is exactly that of the real model. Norm gains are set to one and norm biases to
zero, so that every layer sees activations of the usual scale (a near-zero gain would shrink the
residual stream to nothing and leave the later layers computing on denormals).

The weights are filled in place on their device (fast on a GPU), then the model goes through
the same `prepare_for_inference` as loaded weights (see model/loader.py).
"""

from __future__ import annotations

import torch
from torch import nn

DUMMY_WEIGHT_RANGE = 1e-3  # weights are drawn from U(-range, range)
DUMMY_SEED = 1234


def is_norm(module: nn.Module) -> bool:
    """RMSNorm, nn.LayerNorm and the like: their parameters are gains and shifts."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def norm_parameter_names(model: nn.Module) -> set[str]:
    return {f"{name}.{param_name}" if name else param_name
            for name, module in model.named_modules() if is_norm(module)
            for param_name, _ in module.named_parameters(recurse=False)}


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, seed: int = DUMMY_SEED) -> None:
    """Fill every parameter (a tied one once) with reproducible random values, in place."""
    norms = norm_parameter_names(model)
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():  # shared (tied) parameters come once
        if name in norms:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        if param.dtype == torch.uint8:  # packed quantized blocks (GGUF): random bytes would
            param.zero_()  # make NaN scales; zero blocks are valid, the work per token the same
            continue
        if not param.dtype.is_floating_point or param.element_size() == 1:  # codes, fp8
            raise ValueError(f"load_format='dummy' cannot fill the quantized weight {name!r} "
                             f"({param.dtype}); load the checkpoint's own weights")
        generator = generators.get(param.device)
        if generator is None:
            generator = generators[param.device] = torch.Generator(device=param.device)
            generator.manual_seed(seed)
        param.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generator)
