"""Speculative decoding on tiny random Llamas: exact greedy under prefix caching and
preemption, a clean rollback, and sampled tokens from the same distribution as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_llm
from scipy.stats import chi2_contingency
from transformers import AutoModelForCausalLM, LlamaConfig

from pagedllm import SamplingParams, TokensPrompt
from pagedllm.core.kv_cache_manager import hash_block

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                    "prompt_lookup_min": 1})


def save_llama(folder: Path, vocab: int, scale: float, seed: int = 0, layers: int = 2) -> Path:
    config = LlamaConfig(hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         num_hidden_layers=layers,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(scale)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def greedy_model(tmp_path_factory) -> Path:
    """Scaled up so its argmax is decisive (no near-ties for rounding to flip)."""
    return save_llama(tmp_path_factory.mktemp("spec-greedy"), vocab=128, scale=4.0)


@pytest.fixture(scope="module")
def sampling_model(tmp_path_factory) -> Path:
    """16 tokens and mild weights: a spread next-token distribution worth sampling."""
    return save_llama(tmp_path_factory.mktemp("spec-sampling"), vocab=16, scale=2.5)


def engines(folder: Path, speculative_config: str = NGRAM, **settings):
    settings = dict(model=str(folder), skip_tokenizer_init=True, **settings)
    return make_llm(**settings), make_llm(speculative_config=speculative_config, **settings)


def draft_config(folder: Path, k: int = 3) -> str:
    return json.dumps({"model": str(folder), "num_speculative_tokens": k})


def mixed_prompts(count: int) -> list[TokensPrompt]:
    """Mixed lengths (3 to 48), with shared prefixes, repeats for the n-gram lookup to find."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randint(2, 128, (48,), generator=generator).tolist()
    prompts = []
    for i in range(count):
        length = 3 + (i * 7) % 46
        body = base[:length] if i % 2 else torch.randint(2, 128, (length,),
                                                         generator=generator).tolist()
        prompts.append(TokensPrompt(prompt_token_ids=body + body[: length // 2]))
    return prompts


def greedy_ids(llm, prompts, max_tokens=24):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_identical_with_prefix_caching_and_preemption(greedy_model):
    """16 mixed prompts in a cache of 24 blocks of 4 tokens (they need far more): requests are
    preempted and recomputed, chunks split prompts, and the second pass over the same prompts
    takes its prefixes from the cache, verifying drafts on top of them."""
    plain, spec = engines(greedy_model, kv_cache_memory_bytes=24 * 4 * 2 * 2 * 2 * 16 * 4,
                          block_size=4, max_num_batched_tokens=32, enable_prefix_caching=True)
    assert spec.llm_engine.engine_core.cache_config.num_blocks == 24
    prompts = mixed_prompts(16)
    expected = greedy_ids(plain, prompts)
    core = spec.llm_engine.engine_core
    hits_before = core.kv_cache_stats().prefix_cache_hits
    assert greedy_ids(spec, prompts) == expected
    assert greedy_ids(spec, prompts) == expected  # now with prefix-cache hits
    stats = core.stats()
    assert stats.kv_cache.prefix_cache_hits > hits_before
    assert any(r.preempted for r in spec.llm_engine.step_records)
    assert stats.spec_decoding.num_accepted_tokens > 0
    assert stats.spec_decoding.num_draft_tokens > stats.spec_decoding.num_accepted_tokens
    assert_cache_holds_only_real_tokens(core, prompts, expected)


def assert_cache_holds_only_real_tokens(core, prompts, outputs) -> None:
    """Every block hash in the prefix cache is the hash of a prefix of some request's real
    tokens (prompt + output): no rejected draft is findable."""
    bs = core.kv_cache_manager.block_size
    real = set()
    for prompt, output in zip(prompts, outputs):
        tokens = prompt["prompt_token_ids"] + output
        parent = None
        for start in range(0, len(tokens) - bs + 1, bs):
            parent = hash_block(parent, tokens[start : start + bs])
            real.add(parent)
    cached = {b.block_hash for b in core.block_pool.blocks if b.block_hash is not None}
    assert cached and cached <= real


def test_rollback_after_many_rejections_frees_everything(greedy_model):
    """Prompts built to make the lookup propose often and be wrong (random tokens from a set
    of 8, so every token has been seen before, followed by anything): after the run every
    block is free (the suite's check after each test) and the cache holds real tokens only."""
    plain, spec = engines(greedy_model, kv_cache_memory_bytes=1 << 20, block_size=4,
                          enable_prefix_caching=True)
    generator = torch.Generator().manual_seed(2)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(2, 10, (40,),
                                                           generator=generator).tolist())
               for _ in range(6)]
    core = spec.llm_engine.engine_core
    before = core.stats().spec_decoding.copy()
    expected = greedy_ids(plain, prompts, 16)
    assert greedy_ids(spec, prompts, 16) == expected
    after = core.stats().spec_decoding
    rejected = ((after.num_draft_tokens - before.num_draft_tokens)
                - (after.num_accepted_tokens - before.num_accepted_tokens))
    assert rejected >= 20
    assert_cache_holds_only_real_tokens(core, prompts, expected)


SAMPLING_CASES = {
    "temperature": dict(temperature=1.0),
    "top-k": dict(temperature=0.9, top_k=4),
    "top-p": dict(temperature=1.2, top_p=0.7),
}


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampled_tokens_follow_the_same_distribution(sampling_model, case):
    check_sampling(sampling_model, case, NGRAM)


@pytest.fixture(scope="module")
def sampling_draft(tmp_path_factory) -> Path:
    """Another random model on the same 16 tokens: its q differs from the target's p."""
    return save_llama(tmp_path_factory.mktemp("spec-sampling-draft"), vocab=16, scale=2.5,
                      seed=7, layers=1)


def test_sampling_with_a_draft_model_follows_the_same_distribution(sampling_model,
                                                                    sampling_draft):
    """The same check with q a real distribution (accept with p/q, resample max(0, p - q))."""
    check_sampling(sampling_model, "top-k", draft_config(sampling_draft))


def check_sampling(sampling_model: Path, case: str, speculative_config: str) -> None:
    """800 seeded samples of 6 tokens each, with and without speculation: for every position
    the token histograms pass a chi-square test of homogeneity. Seeded, so deterministic; and
    the same test tells the distribution from its top-6 cut, so it has the power to see a
    wrong rule."""
    plain, spec = engines(sampling_model, speculative_config,
                          kv_cache_memory_bytes=4 << 20, max_num_seqs=256,
                          max_num_batched_tokens=2048)
    # the model's own greedy continuation of 3 4 5: the lookup proposes tokens it likes
    prompt = TokensPrompt(prompt_token_ids=[3, 4, 5, 0, 0, 0, 0, 5, 0, 5, 0, 5, 0, 0, 5, 0])
    settings = SAMPLING_CASES[case]
    before = spec.llm_engine.engine_core.stats().spec_decoding.copy()
    with_spec = sample_tokens(spec, prompt, settings, seed_base=0)
    after = spec.llm_engine.engine_core.stats().spec_decoding
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    rejected = after.num_draft_tokens - before.num_draft_tokens - accepted
    assert accepted > 100 and rejected > 500  # both ways out of the rule, many times
    without = sample_tokens(plain, prompt, settings, seed_base=100_000)
    for position in range(6):
        assert homogeneity_p(with_spec[:, position], without[:, position]) > 1e-3, position
    if case == "temperature":  # power: a distribution missing its tail is told apart
        cut = sample_tokens(plain, prompt, dict(temperature=1.0, top_k=6), seed_base=200_000)
        assert min(homogeneity_p(cut[:, p], without[:, p]) for p in range(6)) < 1e-3


def sample_tokens(llm, prompt, settings: dict, seed_base: int, count: int = 800) -> torch.Tensor:
    params = [SamplingParams(max_tokens=6, ignore_eos=True, detokenize=False,
                             seed=seed_base + i, **settings) for i in range(count)]
    outputs = llm.generate([prompt] * count, params, use_tqdm=False)
    return torch.tensor([o.outputs[0].token_ids for o in outputs])


def homogeneity_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of a chi-square test that two samples of tokens come from one distribution
    (tokens neither sample saw are left out)."""
    counts = torch.stack([torch.bincount(a, minlength=16), torch.bincount(b, minlength=16)])
    counts = counts[:, counts.sum(0) > 0]
    return float(chi2_contingency(counts.numpy()).pvalue)


# ---- draft models -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def greedy_draft(tmp_path_factory) -> Path:
    """A different random model (one layer, another seed) on the same 128 tokens."""
    return save_llama(tmp_path_factory.mktemp("spec-greedy-draft"), vocab=128, scale=4.0,
                      seed=5, layers=1)


def test_a_draft_equal_to_the_target_has_every_proposal_accepted(greedy_model):
    """Under preemption (24 blocks of 4 tokens, both models' K/V in each), recompute, chunked
    prompts and prefix-cache hits (the second pass): any wrong draft K/V would show as a
    rejected proposal, so every one must be accepted."""
    settings = dict(kv_cache_memory_bytes=24 * 4 * (2 + 2) * 2 * 2 * 16 * 4, block_size=4,
                    max_num_batched_tokens=32, enable_prefix_caching=True)
    plain, spec = engines(greedy_model, draft_config(greedy_model), **settings)
    core = spec.llm_engine.engine_core
    assert core.cache_config.num_blocks == 24
    prompts = mixed_prompts(10)
    expected = greedy_ids(plain, prompts, 16)
    hits_before = core.kv_cache_stats().prefix_cache_hits
    assert greedy_ids(spec, prompts, 16) == expected
    assert greedy_ids(spec, prompts, 16) == expected
    assert core.kv_cache_stats().prefix_cache_hits > hits_before
    assert any(r.preempted for r in spec.llm_engine.step_records)
    stats = core.stats().spec_decoding
    assert stats.num_draft_tokens > 50 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert_cache_holds_only_real_tokens(core, prompts, expected)


def test_another_draft_model_gives_the_targets_greedy_tokens(greedy_model, greedy_draft):
    plain, spec = engines(greedy_model, draft_config(greedy_draft), kv_cache_memory_bytes=1 << 20)
    prompts = mixed_prompts(6)
    assert greedy_ids(spec, prompts, 16) == greedy_ids(plain, prompts, 16)
    assert spec.llm_engine.engine_core.stats().spec_decoding.num_draft_tokens > 30


def test_a_draft_with_another_vocabulary_is_refused(greedy_model, sampling_model):
    with pytest.raises(ValueError, match="vocabulary .16 tokens. is not the target's .128."):
        make_llm(model=str(greedy_model), skip_tokenizer_init=True,
                 speculative_config=draft_config(sampling_model))
