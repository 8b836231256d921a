"""GPTQ, AWQ and compressed-tensors checkpoints of tiny random Llama models, served with their
weights packed: greedy tokens and logprobs equal transformers' on the same model with the
dequantized weights.

GPTQ and AWQ folders are written by the test from each format's definition (quant_formats.py);
compressed-tensors ones by llm-compressor itself, and read back by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import worker_of
from quant_formats import write_quantized
from tiny_models import assert_matches_transformers, save_tiny_model, tiny_engine
from transformers import LlamaConfig

from pagedllm.model.layers.quantization.packed_linear import PackedLinear
from pagedllm.model.loader import load_model_config

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
            tie_word_embeddings=False)
PROMPTS = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
           [(37 * i + 11) % 509 for i in range(40)]]  # 40 tokens: the prefill GEMM path


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float")
    save_tiny_model(LlamaConfig(**TINY), folder)
    return folder


def reference_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


GPTQ_CASES = {  # bits, group_size, sym, desc_act, v1
    "4bit-g32-sym-v1": (4, 32, True, False, True),
    "4bit-g64-asym-descact-v1": (4, 64, False, True, True),
    "4bit-g128-sym-descact-v2": (4, 128, True, True, False),
    "4bit-perchannel-asym": (4, -1, False, False, True),
    "8bit-g128-sym": (8, 128, True, False, True),
    "8bit-g32-asym-descact-v2": (8, 32, False, True, False),
}


@pytest.mark.parametrize("case", sorted(GPTQ_CASES))
def test_gptq_matches_the_dequantized_model(case, float_model, tmp_path):
    bits, group_size, sym, desc_act, v1 = GPTQ_CASES[case]
    model = reference_model(float_model)
    write_quantized(float_model, tmp_path, model, "gptq", bits, group_size, sym=sym,
                    desc_act=desc_act, v1=v1)
    llm = tiny_engine(tmp_path)
    assert_matches_transformers(llm, model, PROMPTS, 12, logprobs=3)
    assert_weights_stay_packed(llm, tmp_path)


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_matches_the_dequantized_model(group_size, float_model, tmp_path):
    model = reference_model(float_model)
    write_quantized(float_model, tmp_path, model, "awq", 4, group_size, sym=False)
    llm = tiny_engine(tmp_path)
    assert_matches_transformers(llm, model, PROMPTS, 12, logprobs=3)
    assert_weights_stay_packed(llm, tmp_path)


def assert_weights_stay_packed(llm, folder) -> None:
    """Every decoder projection is a packed layer, resident in about the checkpoint's bytes."""
    from safetensors import safe_open

    model = worker_of(llm).runner.model
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 4 * TINY["num_hidden_layers"]  # qkv, o, gate_up, down
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        stored = sum(handle.get_tensor(name).nbytes for name in handle.keys()  # noqa: SIM118
                     if "_proj." in name)
    resident = sum(m.weight_nbytes for m in layers)
    assert 0.8 * stored <= resident <= 1.2 * stored, (resident, stored)


def test_gptq_on_bf16_activations(float_model, tmp_path):
    """bf16 activations through the kernel: close to the float32 reference's tokens."""
    model = reference_model(float_model)
    write_quantized(float_model, tmp_path, model, "gptq", 4, 32)
    llm = tiny_engine(tmp_path, dtype="bfloat16")
    from pagedllm import SamplingParams, TokensPrompt
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], params, use_tqdm=False)
    from tiny_models import transformers_greedy
    assert out[0].outputs[0].token_ids[:2] == transformers_greedy(model, PROMPTS[0], 2)


# ---- bad checkpoints ------------------------------------------------------------------------
def write_gptq_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unsupported_bits_are_a_clear_error(float_model, tmp_path):
    write_quantized(float_model, tmp_path, reference_model(float_model), "gptq", 4, 32)
    write_gptq_config(tmp_path, bits=3)
    with pytest.raises(ValueError, match="bits=3 are not supported; supported: 4, 8"):
        load_model_config(str(tmp_path))


@pytest.mark.parametrize(("changes", "message"), [
    ({"group_size": 64}, r"weight '?model\.layers\.0\..*(scales|qzeros).* has shape"),
    ({"bits": 8}, r"weight '?model\.layers\.0\..*qweight.* has shape"),
])
def test_settings_that_do_not_match_the_tensors_name_the_weight(float_model, tmp_path, changes,
                                                                message):
    from pagedllm.attention import get_attention_backend
    from pagedllm.model.loader import load_model

    write_quantized(float_model, tmp_path, reference_model(float_model), "gptq", 4, 32)
    write_gptq_config(tmp_path, **changes)
    config = load_model_config(str(tmp_path), "float32")
    with pytest.raises(ValueError, match=message):
        load_model(config, get_attention_backend("cpu"), "cpu")


def test_awq_gemv_is_refused(float_model, tmp_path):
    write_quantized(float_model, tmp_path, reference_model(float_model), "awq", 4, 32)
    write_gptq_config(tmp_path, version="gemv")
    with pytest.raises(ValueError, match="AWQ version 'gemv' is not supported"):
        load_model_config(str(tmp_path))
