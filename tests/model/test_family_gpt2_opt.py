"""GPT-2 and OPT on tiny random models built locally with transformers: greedy tokens and their
logprobs must match.

Prompts of different lengths go through a small token budget, so prefill is chunked and the
learned position lookup is checked at chunk boundaries; prefix caching is on.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_matches_transformers, save_tiny_model, tiny_engine
from transformers import GPT2Config, OPTConfig

OPT_TINY = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=512, max_position_embeddings=256)
FAMILIES = {
    "gpt2": lambda: GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=512,
                               n_positions=256),
    "opt": lambda: OPTConfig(**OPT_TINY, word_embed_proj_dim=64),
    # OPT-350m's shape: post-norm layers and a narrower token embedding with project_in/out
    "opt-350m-like": lambda: OPTConfig(**OPT_TINY, word_embed_proj_dim=32,
                                       do_layer_norm_before=False),
}
PROMPTS = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42] * 30,
           [42] * 30 + [7, 8]]  # the last shares a cached prefix with the one before
MAX_TOKENS = 20


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, save_tiny_model(FAMILIES[request.param](), folder)


def test_greedy_and_logprobs_match_transformers(tiny_model):
    folder, hf_model = tiny_model
    assert_matches_transformers(tiny_engine(folder), hf_model, PROMPTS, MAX_TOKENS, logprobs=2)


def test_checkpoint_names_without_prefix_load(tiny_model):
    """Original GPT-2/OPT conversions have no `transformer.` / `model.` prefix."""
    folder, hf_model = tiny_model
    ours = loaded_model(tiny_engine(folder))
    state = {name.removeprefix("transformer.").removeprefix("model."): tensor
             for name, tensor in hf_model.state_dict().items()}
    if "h.0.attn.c_attn.weight" in state:  # old GPT-2 files also hold the causal-mask buffers
        state["h.0.attn.bias"] = torch.ones(1, 1, 256, 256)
        state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    before = {name: p.detach().clone() for name, p in ours.named_parameters()}
    ours.load_weights(state.items())
    for name, param in ours.named_parameters():
        assert torch.equal(param, before[name]), name


def test_missing_and_unexpected_weights_raise(tiny_model):
    folder, hf_model = tiny_model
    ours = loaded_model(tiny_engine(folder))
    state = dict(hf_model.state_dict())
    with pytest.raises(ValueError, match="missing"):
        ours.load_weights(list(state.items())[1:])
    with pytest.raises(ValueError, match="unexpected"):
        ours.load_weights([*state.items(), ("h.0.attn.bogus.weight", torch.zeros(1))])


def test_bfloat16_first_tokens_match(tiny_model):
    """bf16 on CPU runs the packed oneDNN weights; the decisive first token must still agree."""
    folder, hf_model = tiny_model
    llm = tiny_engine(folder, dtype="bfloat16", enable_prefix_caching=False)
    assert_matches_transformers(llm, hf_model, PROMPTS, 1)


def loaded_model(llm) -> torch.nn.Module:
    return llm.llm_engine.worker.runner.model
