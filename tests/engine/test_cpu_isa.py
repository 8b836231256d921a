"""Every kernel level this CPU executes runs the engine correctly, and bf16 runs on CPUs whose
oneDNN cannot (the probe forced down to AVX2 stands in for AMD Zen 3 on any machine)."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, make_llm, worker_of

from pagedllm import SamplingParams
from pagedllm.model.layers.linear import Linear
from pagedllm.platform.cpu import ISA_LEVELS, cpu_info

GREEDY_32 = SamplingParams(temperature=0, max_tokens=32)


def loaded_linears(llm) -> list[Linear]:
    return [m for m in worker_of(llm).runner.model.modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("level", ISA_LEVELS)
def test_greedy_matches_transformers_at_every_kernel_level(force_cpu_isa, hf_greedy, level):
    force_cpu_isa(level)
    # a 32-token step budget chunks the longer prompts: prefill after a cached prefix, too
    llm = make_llm(max_num_batched_tokens=32)
    assert worker_of(llm).runner.model.model.layers[0].self_attn.backend.ops.level == level
    outputs = llm.generate(PROMPTS, GREEDY_32, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(prompt, 32), prompt


def test_bfloat16_generates_without_onednn_bf16(force_cpu_isa, hf_greedy):
    force_cpu_isa("avx2")
    assert not cpu_info().onednn_bf16
    llm = make_llm(dtype="bfloat16", quantization="none")  # float Linear layers
    linears = loaded_linears(llm)
    assert linears and all(m.float32_compute and m.packed_weight is None for m in linears)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        tokens = output.outputs[0].token_ids
        assert len(tokens) == 16
        assert tokens[0] == hf_greedy(prompt, 16)[0], prompt  # bf16 vs float32: the first token
