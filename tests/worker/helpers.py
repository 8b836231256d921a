"""A tiny Llama known only by its config.json (load_format="dummy"), and a stand-in for CUDA
graph replay that runs the captured forward eagerly, so the graph path runs on the CPU."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig

from pagedllm.worker.cuda_graph import DecodeGraphs

VOCAB_SIZE = 96
MAX_POSITIONS = 64


def write_config_only_model(folder: Path, **overrides) -> Path:
    """A folder holding nothing but config.json: no weights, no tokenizer."""
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                  max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False)
    LlamaConfig(**{**fields, **overrides}).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    return folder


@torch.no_grad()
def sharpen(model: torch.nn.Module, factor: float = 200.0) -> torch.nn.Module:
    """Scale a dummy model's matrices up (float32 models only: packed bf16 copies would not
    follow). Dummy weights are so small that attention is nearly uniform and logits nearly
    equal, which would hide a wrong position or a wrong block from a comparison."""
    for param in model.parameters():
        if param.dim() > 1:
            param.mul_(factor)
    return model


class EagerReplay:
    """What replaying the graph of `size` does, done eagerly: the forward on the static input
    buffers, its result written into the static output."""

    def __init__(self, graphs: DecodeGraphs, size: int) -> None:
        self.graphs, self.size = graphs, size
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        metadata = self.graphs.inputs.metadata(self.size)
        self.graphs.outputs[self.size].copy_(self.graphs._forward(metadata, self.size))


def install_eager_graphs(graphs: DecodeGraphs, hidden_size: int) -> list[EagerReplay]:
    """Fill `graphs` with EagerReplay stand-ins instead of capturing (which needs CUDA)."""
    dtype = next(graphs.model.parameters()).dtype
    replays = []
    for size in graphs.sizes:
        replays.append(EagerReplay(graphs, size))
        graphs.graphs[size] = replays[-1]
        graphs.outputs[size] = torch.full((size, hidden_size), float("nan"), dtype=dtype)
    return replays
