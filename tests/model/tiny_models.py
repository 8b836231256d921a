"""Tiny random-weight models saved by transformers, and transformers' own greedy output for them:
the pieces every model-family test builds on."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig


def save_tiny_model(config: PretrainedConfig, folder: Path):
    """A float32 model from `config` with its matrices scaled up (a larger spread makes the
    random model's argmax decisive), saved with save_pretrained; returns the model."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(4.0)
    model.save_pretrained(folder)
    return model


def transformers_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Exactly `max_tokens` greedy tokens after `prompt` (EOS not honoured)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
