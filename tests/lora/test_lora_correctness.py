"""Adapters made with peft on tiny random Llama and Qwen3 models: our greedy tokens and logprobs
are transformers + peft's, adapter by adapter and with adapters mixed in one batch."""

from __future__ import annotations

import pytest
import torch
from lora_models import ALL, ATTENTION, lora, peft_reference, save_adapter, save_base
from tiny_models import assert_logprobs_match, tiny_engine, transformers_greedy

from pagedllm import SamplingParams, TokensPrompt

# name -> (rank, alpha, targets, use_rslora): ranks differ, one rslora, one attention-only
ADAPTERS = {
    "all-r8": (8, 16, ALL, False),
    "attn-r4-rslora": (4, 8, ATTENTION, True),
    "mlp-r16": (16, 8, ["gate_proj", "up_proj", "down_proj"], False),
}
PROMPTS = [list(range(3, 40)), [7, 300, 12, 45, 9], list(range(100, 121))]
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family(request, tmp_path_factory):
    """(base folder, {adapter name: folder}) for one family."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    save_base(request.param, root / "base")
    folders = {}
    for seed, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items(), start=1):
        folders[name] = root / name
        save_adapter(root / "base", folders[name], rank, alpha, targets, seed, rslora)
    return root / "base", folders


def lora_engine(base, **overrides):
    return tiny_engine(base, enable_lora=True, max_loras=3, max_lora_rank=16, **overrides)


def params(logprobs: int | None = 2) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False,
                          logprobs=logprobs)


def requests_of(folders) -> dict[str, object]:
    return {name: lora(name, i, folder) for i, (name, folder) in enumerate(folders.items(), 1)}


def test_each_adapter_matches_peft(family):
    base, folders = family
    llm = lora_engine(base)
    loras = requests_of(folders)
    for name, folder in folders.items():
        reference = peft_reference(base, folder)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params(),
                               use_tqdm=False, lora_request=loras[name])
        for prompt, output in zip(PROMPTS, outputs):
            completion = output.outputs[0]
            assert completion.token_ids == transformers_greedy(reference, prompt, MAX_TOKENS), name
            assert_logprobs_match(reference, prompt, completion)


def test_adapters_change_the_output(family):
    """Non-zero B: every adapter's greedy text differs from the base model's somewhere (else
    the comparison above would prove nothing)."""
    base, folders = family
    prompt = PROMPTS[0]
    base_tokens = transformers_greedy(peft_reference(base, None), prompt, MAX_TOKENS)
    for folder in folders.values():
        assert transformers_greedy(peft_reference(base, folder), prompt, MAX_TOKENS) != base_tokens


def test_mixed_batch_equals_each_alone_and_shares_steps(family):
    """Three adapters and the base model interleaved in one generate call give what each gives
    alone, and ran together in the same steps."""
    base, folders = family
    llm = lora_engine(base, max_num_batched_tokens=256)
    loras = [*requests_of(folders).values(), None]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS for _ in loras]
    per_prompt = [lora_request for _ in PROMPTS for lora_request in loras]
    alone = [llm.generate([p], params(), use_tqdm=False, lora_request=r)[0].outputs[0]
             for p, r in zip(prompts, per_prompt)]
    before = len(llm.llm_engine.step_records)
    mixed = llm.generate(prompts, params(), use_tqdm=False, lora_request=per_prompt)
    for single, together in zip(alone, mixed):
        assert together.outputs[0].token_ids == single.token_ids
        worst = max(abs(a[t].logprob - b[t].logprob)
                    for a, b in zip(single.logprobs, together.outputs[0].logprobs) for t in a)
        assert worst < 1e-4
    records = list(llm.llm_engine.step_records)[before:]
    shared = [r for r in records if len(r.loras) == 3 and len(r.scheduled) == len(prompts)]
    assert shared, "the adapters never ran in one step"


def test_bin_adapter_matches_safetensors(family, tmp_path):
    """adapter_model.bin (torch.save) loads like the safetensors file it was made from."""
    from safetensors.torch import load_file

    base, folders = family
    source = folders["all-r8"]
    copy = tmp_path / "bin-adapter"
    copy.mkdir()
    (copy / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    torch.save(load_file(source / "adapter_model.safetensors"), copy / "adapter_model.bin")
    llm = lora_engine(base)
    prompt = [TokensPrompt(prompt_token_ids=PROMPTS[0])]
    from_bin = llm.generate(prompt, params(None), use_tqdm=False,
                            lora_request=lora("as-bin", 50, copy))
    reference = peft_reference(base, source)
    assert from_bin[0].outputs[0].token_ids == transformers_greedy(reference, PROMPTS[0],
                                                                   MAX_TOKENS)


def test_beam_search_runs_under_the_adapter(family):
    """beam_search runs every beam under the adapter: its best beam's first token is the
    adapter's greedy token, not the base model's."""
    from pagedllm.engine.beam_ranking import BeamSearchParams

    base, folders = family
    llm = lora_engine(base)
    request = requests_of(folders)["all-r8"]
    prompt = PROMPTS[1]
    out = llm.beam_search([TokensPrompt(prompt_token_ids=prompt)],
                          BeamSearchParams(beam_width=2, max_tokens=1), lora_request=request)
    first = out[0].sequences[0].tokens[len(prompt)]
    reference = peft_reference(base, folders["all-r8"])
    assert first == transformers_greedy(reference, prompt, 1)[0]
