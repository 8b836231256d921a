"""Tiny random-weight models saved by transformers, and transformers' own greedy output for them:
the pieces every model-family test builds on."""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from conftest import make_llm
from transformers import AutoModelForCausalLM, PretrainedConfig

from pagedllm import LLM, SamplingParams, TokensPrompt


def save_tiny_model(config: PretrainedConfig, folder: Path, norm_noise: float = 0.0):
    """A float32 model from `config` with its matrices scaled up (a larger spread makes the
    random model's argmax decisive), saved with save_pretrained; returns the model.

    norm_noise > 0 adds that much Gaussian noise to every norm weight, which transformers
    initialises to a constant (zero for Gemma's (1 + w) norms, where a constant would hide how
    the weight is applied)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.mul_(4.0)
            elif norm_noise and "norm" in name:
                param.add_(torch.randn_like(param) * norm_noise)
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


def assert_logprobs_match(model, prompt: list[int], completion, atol: float = 1e-3) -> None:
    """Every logprob the engine returned along `completion` (the sampled token's and the top
    ones a request with SamplingParams(logprobs=k) asked for) equals transformers' float32
    log-softmax at the same step, from one forward pass over prompt + completion."""
    full = prompt + list(completion.token_ids)
    with torch.inference_mode():
        logits = model(torch.tensor([full])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    assert completion.logprobs is not None and len(completion.logprobs) == len(reference)
    worst = max(abs(entry.logprob - row[token_id].item())
                for row, entries in zip(reference, completion.logprobs)
                for token_id, entry in entries.items())
    assert worst <= atol, f"logprobs differ from transformers' by up to {worst:.2e}"


def tiny_engine(folder: Path, **overrides) -> LLM:
    """An engine on a tiny model on token ids, with prefix caching and a 16-token step budget,
    so prompts longer than that are prefilled in chunks."""
    settings = dict(model=str(folder), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20,
                    enable_prefix_caching=True, max_num_batched_tokens=16)
    return make_llm(**(settings | overrides))


def assert_matches_transformers(llm: LLM, model, prompts: list[list[int]], max_tokens: int,
                                logprobs: int | None = None) -> None:
    """The engine's greedy tokens for each prompt are transformers' and, when `logprobs` is
    given, so are their logprobs (assert_logprobs_match)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False, logprobs=logprobs)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        assert completion.token_ids == transformers_greedy(model, prompt, max_tokens)
        if logprobs is not None:
            assert_logprobs_match(model, prompt, completion)


def write_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    """A tiny model's config as GGUF metadata, through gguf-py's own writer."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"] if "full_attention" in rope
                              else rope["rope_theta"])
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
