"""Tiny random base models and PEFT adapters on them, made with transformers and peft, with B
drawn at random (PEFT starts B at zero, which would make every adapter the base model)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from benchmarks.lora_throughput import write_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))  # tiny_models.py

from tiny_models import save_tiny_model  # noqa: E402

from pagedllm.lora.request import LoRARequest  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    # head_dim 32 differs from hidden_size / heads, and q/k are RMS-normalized per head
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def save_base(family: str, folder: Path) -> None:
    save_tiny_model(FAMILIES[family](), folder)


def save_adapter(base: Path, folder: Path, rank: int, alpha: float, targets: list[str],
                 seed: int, use_rslora: bool = False) -> None:
    """A PEFT LoRA adapter of `base` with random A and B, saved with save_pretrained."""
    write_adapter(base, folder, rank, alpha, targets, seed, scale=0.3, use_rslora=use_rslora,
                  lora_dropout=0.0)


def peft_reference(base: Path, adapter: Path | None):
    """transformers' model with the adapter applied by peft (None: the base model alone)."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return model if adapter is None else PeftModel.from_pretrained(model, adapter).eval()


def lora(name: str, lora_id: int, folder: Path) -> LoRARequest:
    return LoRARequest(name, lora_id, str(folder))
