"""Loading: GGUF dequantization (quantization="none") is bit-exact with transformers, HF
folders load the same weights, and the model-source rules give clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPTS, make_llm
from safetensors.torch import load_file

from pagedllm import SamplingParams
from pagedllm.attention import get_attention_backend
from pagedllm.model.gguf_file import GGUFFile, unpermute_rotary_rows
from pagedllm.model.loader import bf16_is_native, load_model, load_model_config, resolve_dtype
from pagedllm.model.source import default_model_path, resolve_model_source


@pytest.fixture(scope="module")
def gguf_model():
    config = load_model_config(None, "float32", quantization="none")
    return load_model(config, get_attention_backend("cpu"), "cpu")


def test_gguf_weights_equal_transformers_dequantization(gguf_model, reference_dir):
    reference = load_file(reference_dir / "model.safetensors")
    ours = dict(gguf_model.named_parameters())
    layer = "model.layers.3"
    q, k, v = ours[f"{layer}.self_attn.qkv_proj.weight"].split([576, 192, 192])
    gate, up = ours[f"{layer}.mlp.gate_up_proj.weight"].split([1536, 1536])
    pairs = {
        "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
        "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
        "mlp.down_proj.weight": ours[f"{layer}.mlp.down_proj.weight"],
        "input_layernorm.weight": ours[f"{layer}.input_layernorm.weight"],
    }
    for name, tensor in pairs.items():
        assert torch.equal(tensor, reference[f"{layer}.{name}"]), name
    assert torch.equal(ours["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    assert gguf_model.lm_head.weight is gguf_model.model.embed_tokens.weight  # tied


def test_gguf_config_matches_the_file():
    with GGUFFile(default_model_path()) as gguf_file:
        config = gguf_file.hf_config()
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152


def test_unpermute_inverts_llama_cpp_permutation():
    heads, dim, cols = 3, 8, 5
    weight = torch.randn(heads * dim, cols)
    # llama.cpp's conversion: per head, interleave the two halves of the rotary rows
    permuted = weight.reshape(heads, 2, dim // 2, cols).transpose(1, 2).reshape(heads * dim, cols)
    assert torch.equal(unpermute_rotary_rows(permuted, heads), weight)


def test_hf_folder_gives_the_same_tokens_as_gguf(llm, reference_dir):
    folder_llm = make_llm(model=str(reference_dir))
    params = SamplingParams(temperature=0, max_tokens=24)
    got = folder_llm.generate(PROMPTS[:4], params, use_tqdm=False)
    expected = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]


def test_sharded_safetensors_folder(reference_dir, tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(reference_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    for index, part in enumerate((names[:half], names[half:])):
        shard = tmp_path / f"model-0000{index + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, shard)
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(reference_dir / extra, tmp_path / extra)
    config = load_model_config(str(tmp_path), "float32")
    model = load_model(config, get_attention_backend("cpu"), "cpu")
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


def test_missing_weights_are_reported(reference_dir, tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(reference_dir / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(reference_dir / "config.json", tmp_path / "config.json")
    config = load_model_config(str(tmp_path), "float32")
    with pytest.raises(ValueError, match="missing weights"):
        load_model(config, get_attention_backend("cpu"), "cpu")


def test_unsupported_architecture_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="not supported; supported types: .*llama"):
        load_model_config(str(tmp_path))


def test_source_resolution(tmp_path):
    assert resolve_model_source(None).is_gguf
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    text_file = tmp_path / "weights.bin"
    text_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_source(str(text_file))


def test_max_model_len_above_the_model_limit():
    with pytest.raises(ValueError, match="exceeds the model's limit of 8192"):
        load_model_config(None, max_model_len=100_000)


def test_dtype_auto_and_explicit(reference_dir):
    assert load_model_config(str(reference_dir)).dtype == torch.float32  # as saved
    native = torch.bfloat16 if bf16_is_native("cpu") else torch.float32
    assert load_model_config(None).dtype == native  # GGUF: the fastest native float
    assert load_model_config(str(reference_dir), "bfloat16").dtype == torch.bfloat16


def test_dtype_auto_keeps_bf16_checkpoints_only_where_the_cpu_runs_bf16(force_cpu_isa):
    from transformers import LlamaConfig

    config = LlamaConfig(dtype="bfloat16")
    native = torch.bfloat16 if bf16_is_native("cpu") else torch.float32
    assert resolve_dtype("auto", config, "cpu") == native
    force_cpu_isa("avx2")  # no oneDNN bf16: float32 measured faster
    assert resolve_dtype("auto", config, "cpu") == torch.float32
    assert resolve_dtype("auto", config, "cpu", is_gguf=True) == torch.float32
    assert resolve_dtype("bfloat16", config, "cpu") == torch.bfloat16  # asked for: it runs


def test_every_quantization_choice_is_none_or_a_registered_method():
    from pagedllm.config import QUANTIZATION_CHOICES
    from pagedllm.model.layers.quantization import QUANTIZATION_METHODS, method_class

    assert set(QUANTIZATION_CHOICES) == {"none", *QUANTIZATION_METHODS}
    assert all(method_class(name).name == name for name in QUANTIZATION_METHODS)
