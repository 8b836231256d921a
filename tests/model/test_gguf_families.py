"""GGUF files of the newer families, read back by pagedllm and compared with the model they came
from.

Each tiny transformers model is written the way llama.cpp's converter writes it: tensor names
from gguf-py's own HF -> GGUF name map (not our loader's table), metadata through GGUFWriter,
and Gemma's norm weights stored with the 1 of (1 + w) folded in. The engine then loads the .gguf
and must produce the original model's greedy tokens.
"""

from __future__ import annotations

import gguf
import pytest
from tiny_models import (
    assert_matches_transformers,
    save_tiny_model,
    tiny_engine,
    write_metadata,
)
from transformers import Gemma2Config, Gemma3TextConfig, Qwen2Config, Qwen3Config

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256, head_dim=16)
# GGUF carries no query scale for Gemma; llama.cpp (and our loader) use 1/sqrt(head_dim).
GEMMA = dict(TINY, query_pre_attn_scalar=16, sliding_window=8)
FAMILIES = {
    "qwen2": (gguf.MODEL_ARCH.QWEN2, lambda: Qwen2Config(**TINY, num_hidden_layers=2)),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, lambda: Qwen3Config(**TINY, num_hidden_layers=2)),
    "gemma2": (gguf.MODEL_ARCH.GEMMA2, lambda: Gemma2Config(
        **GEMMA, num_hidden_layers=2, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # six layers: Gemma 3's default pattern puts one global layer after five local ones
    "gemma3": (gguf.MODEL_ARCH.GEMMA3, lambda: Gemma3TextConfig(**GEMMA, num_hidden_layers=6)),
}
NORMS_STORED_PLUS_ONE = {gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3}


def write_gguf(model, arch: gguf.MODEL_ARCH, path) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    write_metadata(writer, config)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensor = tensor.float()
        if arch in NORMS_STORED_PLUS_ONE and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")),
                          tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_gguf(request, tmp_path_factory):
    arch, make_config = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(f"gguf-{request.param}")
    model = save_tiny_model(make_config(), folder)
    path = folder / f"{request.param}.gguf"
    write_gguf(model, arch, path)
    return path, model


def test_gguf_greedy_matches_the_source_model(tiny_gguf):
    path, hf_model = tiny_gguf
    # the 30-token prompt runs past Gemma's 8-token window
    prompts = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
               list(range(40, 70))]
    assert_matches_transformers(tiny_engine(path), hf_model, prompts, 12)


def test_unknown_gguf_architecture_lists_the_supported_ones(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from pagedllm.model.loader import load_model_config

    with pytest.raises(ValueError, match="'mamba' is not supported.*gemma3.*qwen3"):
        load_model_config(str(tmp_path / "x.gguf"))
