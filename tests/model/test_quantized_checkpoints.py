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
from transformers import LlamaConfig, Qwen2Config

from pagedllm.model.layers.quantization.packed_linear import PackedLinear
from pagedllm.model.loader import load_model_config
from pagedllm.worker.kv_cache import weight_bytes

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


def test_gptq_pytorch_path_matches_the_dequantized_model(float_model, tmp_path, monkeypatch):
    """Where the C++ kernel cannot run (CUDA, no compiler) each layer dequantizes its packed
    weight and calls F.linear: the same tokens and logprobs."""
    monkeypatch.setattr("pagedllm.model.layers.quantization.int_weight.kernels_for",
                        lambda *tensors: None)
    model = reference_model(float_model)
    write_quantized(float_model, tmp_path, model, "gptq", 4, 64, sym=False, desc_act=True)
    assert_matches_transformers(tiny_engine(tmp_path), model, PROMPTS, 12, logprobs=3)


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_matches_the_dequantized_model(group_size, float_model, tmp_path):
    model = reference_model(float_model)
    write_quantized(float_model, tmp_path, model, "awq", 4, group_size, sym=False)
    llm = tiny_engine(tmp_path)
    assert_matches_transformers(llm, model, PROMPTS, 12, logprobs=3)
    assert_weights_stay_packed(llm, tmp_path)


def test_gptq_with_biases_qwen2(tmp_path_factory):
    """Qwen2 has q/k/v biases: float tensors beside the packed ones, loaded shard by shard."""
    float_dir, quant_dir = tmp_path_factory.mktemp("qwen2"), tmp_path_factory.mktemp("qwen2q")
    save_tiny_model(Qwen2Config(**TINY), float_dir)
    model = reference_model(float_dir)
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(float_dir)
    write_quantized(float_dir, quant_dir, model, "gptq", 4, 64, sym=False, desc_act=True)
    assert_matches_transformers(tiny_engine(quant_dir), model, PROMPTS, 12, logprobs=3)


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
    assert 0.9 * stored <= resident <= 1.1 * stored, (resident, stored)  # the issue: within 10%
    # the start-up line's weight bytes count the packed layouts too
    others = sum(p.nbytes for name, p in model.named_parameters() if "_proj." not in name)
    assert weight_bytes(model) >= others + resident


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
def assert_activations_quantized(llm, model) -> None:
    """One projection on its own: our output is the reference's (input quantized per token,
    then the dequantized weight), and measurably not the unquantized input's product."""
    ours = worker_of(llm).runner.model.model.layers[0].mlp.down_proj
    reference = model.model.layers[0].mlp.down_proj  # carries the fake-quantizing hook
    x = torch.randn(5, ours.in_features) * torch.logspace(-2, 1, ours.in_features)
    with torch.inference_mode():
        expected, unquantized = reference(x), x @ reference.weight.T
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - unquantized).abs().max() > 1e-2 * unquantized.abs().max()


def assert_greedy_near_reference(llm, model, prompts, max_tokens: int,
                                 max_gap: float = 0.05) -> None:
    """Quantized activations: a last-bit difference in x (kernel vs PyTorch summation order)
    can move a value to the next fp8/int8 code, so two correct runs may part where the top two
    logits are close. Every token we chose must be the reference's best, or within max_gap
    nats of it, at every step of our own continuation (one teacher-forced forward pass)."""
    from pagedllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        chosen = list(output.outputs[0].token_ids)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + chosen])).logits[0, len(prompt) - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        gaps = logprobs.max(-1).values - logprobs[torch.arange(len(chosen)), chosen]
        assert gaps.max().item() <= max_gap, f"greedy token {gaps.max().item():.3f} nats " \
                                             f"below the reference's best"


def write_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unsupported_bits_are_a_clear_error(float_model, tmp_path):
    write_quantized(float_model, tmp_path, reference_model(float_model), "gptq", 4, 32)
    write_config(tmp_path, bits=3)
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
    write_config(tmp_path, **changes)
    config = load_model_config(str(tmp_path), "float32")
    with pytest.raises(ValueError, match=message):
        load_model(config, get_attention_backend("cpu"), "cpu")


def test_dummy_weights_are_refused_for_packed_layers(float_model, tmp_path):
    from pagedllm.attention import get_attention_backend
    from pagedllm.model.loader import load_model

    write_quantized(float_model, tmp_path, reference_model(float_model), "gptq", 4, 32)
    config = load_model_config(str(tmp_path), "float32")
    with pytest.raises(ValueError, match="cannot fill the quantized weight .*qweight"):
        load_model(config, get_attention_backend("cpu"), "cpu", load_format="dummy")


def test_gptq_marlin_format_is_refused(float_model, tmp_path):
    write_quantized(float_model, tmp_path, reference_model(float_model), "gptq", 4, 32)
    write_config(tmp_path, is_marlin_format=True)
    with pytest.raises(ValueError, match="checkpoint_format 'marlin' is not supported"):
        load_model_config(str(tmp_path))


def test_awq_gemv_is_refused(float_model, tmp_path):
    write_quantized(float_model, tmp_path, reference_model(float_model), "awq", 4, 32)
    write_config(tmp_path, version="gemv")
    with pytest.raises(ValueError, match="AWQ version 'gemv' is not supported"):
        load_model_config(str(tmp_path))


# ---- compressed-tensors, written by llm-compressor --------------------------------------------
def llmcompressor_schemes() -> dict:
    """Data-free schemes (min-max observers, no calibration set): presets and two custom groups
    that reach the asymmetric-zero-point and per-tensor-scale paths."""
    group = group_recipe
    per_token_fp8 = dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
    return {
        "W4A16": {"scheme": "W4A16", "targets": ["Linear"]},
        "W8A16": {"scheme": "W8A16", "targets": ["Linear"]},
        "W4A16-asym-g32": group(dict(num_bits=4, type="int", symmetric=False, strategy="group",
                                     group_size=32)),
        "W8A8": {"scheme": "W8A8", "targets": ["Linear"]},
        "FP8_DYNAMIC": {"scheme": "FP8_DYNAMIC", "targets": ["Linear"]},
        "FP8-per-tensor": group(dict(num_bits=8, type="float", symmetric=True, strategy="tensor"),
                                per_token_fp8),
    }


def group_recipe(weights: dict, activations: dict | None = None) -> dict:
    """QuantizationModifier arguments for one custom scheme on every Linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return {"config_groups": {"group_0": QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**weights),
        input_activations=QuantizationArgs(**activations) if activations else None)}}


def compress_with_llmcompressor(float_dir, out_dir, recipe_args: dict) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(ignore=["lm_head"], **recipe_args))
    model.save_pretrained(out_dir, save_compressed=True)


def transformers_dequantized(folder):
    """transformers' own reading of a compressed-tensors folder, weights decompressed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def quantize_activations_per_token(model, kind: str) -> None:
    """The dynamic activation scheme (symmetric, one scale per token: amax / 127 for int8,
    amax / 448 for fp8), applied to every decoder projection's input: transformers'
    decompressed model runs the weights only."""
    def fake_quantize(_module, args):
        x = args[0]
        amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        if kind == "int8":
            scale = amax / 127
            return ((x / scale).round().clamp(-128, 127) * scale,)
        scale = amax / 448
        return ((x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale,)

    for name, module in model.named_modules():
        if name.endswith("_proj"):
            module.register_forward_pre_hook(fake_quantize)


@pytest.fixture(scope="module")
def compressed_models(float_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    folders = {}
    for name, recipe in llmcompressor_schemes().items():
        folders[name] = root / name
        compress_with_llmcompressor(float_model, folders[name], recipe)
    return folders


ACTIVATIONS = {"W8A8": "int8", "FP8_DYNAMIC": "fp8", "FP8-per-tensor": "fp8"}


@pytest.mark.parametrize("scheme", sorted(["W4A16", "W8A16", "W4A16-asym-g32", "W8A8",
                                           "FP8_DYNAMIC", "FP8-per-tensor"]))
def test_compressed_tensors_matches_transformers(scheme, compressed_models):
    folder = compressed_models[scheme]
    model = transformers_dequantized(folder)
    if scheme in ACTIVATIONS:
        quantize_activations_per_token(model, ACTIVATIONS[scheme])
    llm = tiny_engine(folder)
    if scheme in ACTIVATIONS:
        assert_activations_quantized(llm, model)
        assert_greedy_near_reference(llm, model, PROMPTS, 12)
    else:
        assert_matches_transformers(llm, model, PROMPTS, 12, logprobs=3)
    assert_weights_stay_packed(llm, folder)
    head = worker_of(llm).runner.model.lm_head
    assert not isinstance(head, PackedLinear) and head.weight.dtype == torch.float32  # ignored


def test_compressed_tensors_refuses_what_it_cannot_run(compressed_models, tmp_path):
    import shutil

    folder = tmp_path / "static"
    shutil.copytree(compressed_models["W8A8"], folder)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    config["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    write_config(folder, config_groups=config["config_groups"])
    with pytest.raises(ValueError, match="input activations .* are not supported"):
        load_model_config(str(folder))
    config["config_groups"]["group_0"]["input_activations"]["dynamic"] = True
    config["config_groups"]["group_0"]["format"] = "nvfp4-pack-quantized"
    write_config(folder, config_groups=config["config_groups"])
    with pytest.raises(ValueError, match="nvfp4-pack-quantized.* is not supported"):
        load_model_config(str(folder))
    write_config(folder, sparsity_config={"format": "sparse-24-bitmask"})
    with pytest.raises(ValueError, match="sparsity_config is not supported"):
        load_model_config(str(folder))


@pytest.mark.slow
def test_default_model_w4a16_matches_transformers(reference_dir, tmp_path):
    """The bundled model (its GGUF read by transformers, saved as an HF folder), quantized
    W4A16 by llm-compressor (group 64: the hidden size, 576, is not a multiple of the preset's
    128): our greedy tokens are transformers' on the decompressed weights."""
    import shutil

    from conftest import PROMPTS as TEXT_PROMPTS

    from pagedllm import LLM

    folder = tmp_path / "w4a16"
    compress_with_llmcompressor(reference_dir, folder, group_recipe(
        dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)))
    for path in reference_dir.iterdir():
        if "token" in path.name or path.name in ("vocab.json", "merges.txt"):
            shutil.copy(path, folder / path.name)
    model = transformers_dequantized(folder)
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory_bytes=256 << 20)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(text) for text in TEXT_PROMPTS[:4]]
    assert_matches_transformers(llm, model, prompts, 16)
    assert_weights_stay_packed_default(llm)


def assert_weights_stay_packed_default(llm) -> None:
    model = worker_of(llm).runner.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.int_weight.bits == 4 for m in packed)
