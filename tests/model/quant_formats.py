"""GPTQ and AWQ checkpoints written in the test from each format's own definition (not with our
loader's code): round-to-nearest quantization of a float model's linear layers, packed as
AutoGPTQ and AutoAWQ store them, plus the float model with the dequantized weights, the
reference every quantized run must reproduce."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# projections reading the same input share one act order (as GPTQ's Hessian makes them)
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class Quantized:
    codes: torch.Tensor  # [N, K] unsigned
    scales: torch.Tensor  # [G, N] float16
    zeros: torch.Tensor  # [G, N] the code meaning 0
    g_idx: torch.Tensor  # [K] group of each input channel
    dequantized: torch.Tensor  # [N, K] float32: (code - zero) * scale


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                 g_idx: torch.Tensor, min_zero: int = 0) -> Quantized:
    """Min-max round-to-nearest per (output channel, group); scales rounded to float16 first,
    as the checkpoint stores them."""
    n, k = weight.shape
    groups = int(g_idx.max()) + 1
    top = (1 << bits) - 1
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n)
    for g in range(groups):
        block = weight[:, g_idx == g]
        low, high = block.min(1).values.clamp(max=0), block.max(1).values.clamp(min=0)
        if sym:
            scale = torch.maximum(-low, high) * 2 / top
            zero = torch.full((n,), float((top + 1) // 2))
        else:
            scale = (high - low) / top
            zero = (-low / scale).round().clamp(min_zero, top)
        scales[g] = scale.clamp(min=1e-6).half().float()
        zeros[g] = zero
    s, z = scales[g_idx].T, zeros[g_idx].T  # [N, K]
    codes = (weight / s + z).round().clamp(0, top).long()
    return Quantized(codes, scales.half(), zeros.long(), g_idx.int(), (codes - z) * s)


def pack_lsb_first(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack 32 // bits codes per int32 along `dim`, the first in the lowest bits."""
    pack = 32 // bits
    moved = values.long().movedim(dim, -1)
    moved = moved.reshape(*moved.shape[:-1], moved.shape[-1] // pack, pack)
    words = (moved << (torch.arange(pack) * bits)).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def gptq_tensors(q: Quantized, bits: int, v1: bool) -> dict[str, torch.Tensor]:
    zeros = (q.zeros - 1) & ((1 << bits) - 1) if v1 else q.zeros  # v1 stores zero - 1
    return {"qweight": pack_lsb_first(q.codes.T, bits, dim=0),
            "qzeros": pack_lsb_first(zeros, bits, dim=1),
            "scales": q.scales, "g_idx": q.g_idx}


def awq_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    def interleave(rows: torch.Tensor) -> torch.Tensor:  # [R, N] -> AWQ's [R, N / 8]
        grouped = rows.reshape(rows.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
        return pack_lsb_first(grouped.reshape(rows.shape[0], -1), 4, dim=1)

    return {"qweight": interleave(q.codes.T), "qzeros": interleave(q.zeros),
            "scales": q.scales}


def write_quantized(float_dir: Path, out_dir: Path, model, method: str, bits: int,
                    group_size: int, sym: bool = True, desc_act: bool = False,
                    v1: bool = True, seed: int = 0) -> None:
    """Quantize every decoder projection of `model` (loaded from float_dir) into out_dir, and
    set the model's weights to the dequantized values (the reference)."""
    generator = torch.Generator().manual_seed(seed)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    orders: dict[tuple[int, str], torch.Tensor] = {}
    for layer_index in range(model.config.num_hidden_layers):
        for proj in PROJECTIONS:
            name = f"model.layers.{layer_index}.{proj}"
            weight = state.pop(f"{name}.weight")
            k = weight.shape[1]
            size = group_size if group_size > 0 else k
            key = (layer_index, SHARED_INPUT.get(proj, proj))
            if key not in orders:
                order = torch.randperm(k, generator=generator) if desc_act else torch.arange(k)
                orders[key] = torch.empty(k, dtype=torch.long)
                orders[key][order] = torch.arange(k) // size
            # v1 cannot store a zero point of 0 (it would read back as 2**bits)
            q = quantize_rtn(weight, bits, size, sym, orders[key], min_zero=1 if v1 else 0)
            packed = gptq_tensors(q, bits, v1) if method == "gptq" else awq_tensors(q)
            state.update({f"{name}.{key_}": t for key_, t in packed.items()})
            model.get_submodule(name).weight.data.copy_(q.dequantized)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors")
    config = json.loads((float_dir / "config.json").read_text())
    if method == "gptq":
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
            "sym": sym, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": bits,
                                         "group_size": group_size, "zero_point": not sym,
                                         "version": "gemm"}
    (out_dir / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (float_dir / extra).is_file():
            shutil.copy(float_dir / extra, out_dir / extra)
