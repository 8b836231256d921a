"""load_format="dummy": a model built from config.json alone, with small random weights, runs
the whole engine (and the throughput benchmark) on token ids."""

from __future__ import annotations

import json
import math

import pytest
import torch
from worker.helpers import VOCAB_SIZE, write_config_only_model

from pagedllm import LLM, SamplingParams, TokensPrompt
from pagedllm.attention import get_attention_backend
from pagedllm.entrypoints.cli import main
from pagedllm.model.dummy import DUMMY_WEIGHT_RANGE, initialize_dummy_weights
from pagedllm.model.layers.linear import Linear
from pagedllm.model.loader import load_model, load_model_config


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    return write_config_only_model(tmp_path_factory.mktemp("config-only"))


def test_config_only_folder_generates_from_token_ids(config_only):
    llm = LLM(model=str(config_only), load_format="dummy", dtype="float32",
              kv_cache_memory_bytes=4 << 20)
    assert llm.get_tokenizer() is None  # none in the folder: token ids only
    prompts = [TokensPrompt(prompt_token_ids=[5, 9, 11, 40]),
               TokensPrompt(prompt_token_ids=list(range(3, 30)))]
    params = SamplingParams(max_tokens=6, ignore_eos=True, detokenize=False, logprobs=3)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 6
        assert all(0 <= t < VOCAB_SIZE for t in completion.token_ids)
        assert len(completion.logprobs) == 6
        for position in completion.logprobs:
            assert all(math.isfinite(p.logprob) and p.logprob <= 0 for p in position.values())
        # tiny weights: logits nearly equal, so every token is about 1/vocab likely
        chosen = [position[t].logprob for position, t in zip(completion.logprobs,
                                                              completion.token_ids)]
        assert all(abs(p + math.log(VOCAB_SIZE)) < 0.5 for p in chosen)


def test_text_prompts_need_a_tokenizer(config_only):
    llm = LLM(model=str(config_only), load_format="dummy", dtype="float32",
              kv_cache_memory_bytes=4 << 20)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)


def test_real_weights_are_still_required_without_dummy(config_only):
    with pytest.raises(ValueError, match="safetensors"):
        LLM(model=str(config_only), dtype="float32", skip_tokenizer_init=True,
            kv_cache_memory_bytes=4 << 20)


def test_dummy_weights_are_small_norms_are_one_and_ties_hold(config_only):
    config = load_model_config(str(config_only), "float32")
    config.hf_config.tie_word_embeddings = True
    model = load_model(config, get_attention_backend("cpu"), "cpu", "dummy")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    norms = [n for n in params if "norm" in n]
    assert norms and all(torch.equal(params[n], torch.ones_like(params[n])) for n in norms)
    others = [p for n, p in params.items() if n not in norms]
    for param in others:
        assert param.abs().max() <= DUMMY_WEIGHT_RANGE
        assert param.std() > DUMMY_WEIGHT_RANGE / 4  # spread over the range, not constant
    # reproducible: the same seed gives the same weights
    embed = params["model.embed_tokens.weight"].clone()
    initialize_dummy_weights(model)
    assert torch.equal(embed, model.model.embed_tokens.weight)


def test_dummy_weights_go_through_prepare_for_inference(config_only):
    config = load_model_config(str(config_only), "bfloat16")
    model = load_model(config, get_attention_backend("cpu"), "cpu", "dummy")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    # packed for oneDNN where this CPU runs bf16, float32 arithmetic on bf16 weights elsewhere
    assert linears and all(m.packed_weight is not None or m.float32_compute for m in linears)


def test_bench_throughput_on_dummy_weights_with_transformers_baseline(config_only, tmp_path,
                                                                      capsys):
    report_path = tmp_path / "report.json"
    code = main(["bench", "throughput", "--model", str(config_only), "--load-format", "dummy",
                 "--dtype", "float32", "--kv-cache-memory", "8MiB", "--num-prompts", "4",
                 "--input-len", "10", "--output-len", "4", "--baseline", "hf",
                 "--hf-batch-sizes", "4", "--output-json", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    ours, hf = report["results"]
    assert ours["engine"] == "pagedllm" and hf["engine"] == "transformers(bs=4)"
    assert ours["output_tokens"] == hf["output_tokens"] == 16
    assert report["weights"] == "dummy"
    assert "random weights" in capsys.readouterr().out
