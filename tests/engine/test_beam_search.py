"""Beam search gives transformers' beams on the bundled model."""

from __future__ import annotations

import pytest
import torch

from pagedllm import BeamSearchParams

PROMPTS = ["The capital of France is", "My favourite book is"]
MAX_TOKENS = 10


def strip_end(tokens: list[int], eos: int) -> list[int]:
    """transformers pads finished beams with pad_token_id, which is EOS for this model."""
    while tokens and tokens[-1] == eos:
        tokens = tokens[:-1]
    return tokens


@pytest.mark.parametrize("width, length_penalty", [(2, 1.0), (4, 0.5)])
def test_beams_match_transformers(llm, hf_model, width, length_penalty):
    tokenizer = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, length_penalty=length_penalty)
    outputs = llm.beam_search(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.inference_mode():
            expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width,
                                         num_return_sequences=width, do_sample=False,
                                         max_new_tokens=MAX_TOKENS, length_penalty=length_penalty,
                                         output_scores=True, return_dict_in_generate=True)
        eos = tokenizer.eos_token_id
        ours = [strip_end(seq.tokens, eos) for seq in output.sequences]
        theirs = [strip_end(row.tolist(), eos) for row in expected.sequences]
        assert ours[0] == theirs[0], prompt  # the best beam
        assert sorted(map(tuple, ours)) == sorted(map(tuple, theirs)), prompt
        scores = [seq.score for seq in output.sequences]
        assert scores == sorted(scores, reverse=True)
        torch.testing.assert_close(torch.tensor(scores), expected.sequences_scores.float(),
                                   atol=1e-3, rtol=1e-4)


def test_beams_fork_and_share_blocks(llm):
    engine = llm.llm_engine
    copies = engine.engine_core.kv_cache_manager.num_cow_copies
    before = engine.engine_core.block_pool.num_allocations
    prompt = "A story in one sentence about a lighthouse:"
    (output,) = llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=8))
    assert len(output.sequences) == 4
    # forks copied a shared partial block
    assert engine.engine_core.kv_cache_manager.num_cow_copies > copies
    prompt_blocks = len(llm.get_tokenizer().encode(prompt)) // 16 + 1
    # the prompt once, then at most a couple of blocks per live beam, never a prompt per beam
    assert engine.engine_core.block_pool.num_allocations - before <= prompt_blocks + 4 * 2 + 8


def test_beam_search_rejects_bad_params():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
