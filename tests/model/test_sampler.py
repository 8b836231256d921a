"""Logits processors and penalties on fixed logit vectors, against transformers' processors or
hand-computed values; the batch is assembled by the runner from scheduled requests."""

from __future__ import annotations

import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from pagedllm.core.step_io import ScheduledRequest
from pagedllm.model.layers.sampler import Sampler, apply_logits_processors
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.model_runner import ModelRunner

VOCAB = 12


def runner() -> ModelRunner:
    return ModelRunner(model=None, kv_caches=None, block_size=4, device="cpu", seed=0,
                       vocab_size=VOCAB)


def row(params: SamplingParams, prompt=(1, 2, 3), output=()) -> ScheduledRequest:
    return ScheduledRequest("r", [0], len(prompt), [0], params, list(output), list(prompt), True)


def process(logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
    batch = runner().sampling_batch(rows)
    return apply_logits_processors(logits.clone(), batch)


def fixed_logits(rows: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows, VOCAB) * 3


def test_repetition_penalty_equals_transformers():
    logits = fixed_logits()
    prompt, output = [1, 2, 3], [3, 5, 5, 9]
    got = process(logits, [row(SamplingParams(repetition_penalty=1.7), prompt, output)])
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(got, expected)


def test_presence_and_frequency_penalties_by_hand():
    logits = fixed_logits()
    output = [4, 4, 4, 7]
    got = process(logits, [row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                               prompt=[4, 8], output=output)])
    expected = logits.clone()
    expected[0, 4] -= 0.5 + 3 * 0.25
    expected[0, 7] -= 0.5 + 1 * 0.25
    torch.testing.assert_close(got, expected)  # the prompt's token 8 is untouched


def test_each_row_gets_its_own_penalties():
    logits = fixed_logits(2)
    rows = [row(SamplingParams(frequency_penalty=1.0), output=[2, 2]),
            row(SamplingParams(), output=[2, 2])]
    got = process(logits, rows)
    assert got[0, 2] == logits[0, 2] - 2.0
    torch.testing.assert_close(got[1], logits[1])


def test_logit_bias_and_allowed_token_ids():
    logits = fixed_logits(2)
    rows = [row(SamplingParams(logit_bias={3: 5.0, 6: -100.0})),
            row(SamplingParams(allowed_token_ids=[1, 4]))]
    got = process(logits, rows)
    expected0 = logits[0].clone()
    expected0[3] += 5.0
    expected0[6] -= 100.0
    torch.testing.assert_close(got[0], expected0)
    assert torch.isinf(got[1, [0, 2, 3, 5]]).all()
    torch.testing.assert_close(got[1, [1, 4]], logits[1, [1, 4]])


def test_bad_words_ban_the_completing_token():
    params = SamplingParams()
    params.bad_words_token_ids = [[9], [2, 6]]
    got = process(fixed_logits(), [row(params, output=[5, 2])])  # "2" just produced -> ban 6
    assert torch.isinf(got[0, 9]) and torch.isinf(got[0, 6])
    got = process(fixed_logits(), [row(params, output=[5, 1])])
    assert torch.isinf(got[0, 9]) and not torch.isinf(got[0, 6])


def test_min_tokens_bans_stop_tokens():
    params = SamplingParams(min_tokens=3, stop_token_ids=[7])
    params.eos_token_id = 2
    got = process(fixed_logits(), [row(params, output=[1])])
    assert torch.isinf(got[0, [2, 7]]).all()
    got = process(fixed_logits(), [row(params, output=[1, 1, 1])])
    assert not torch.isinf(got).any()


def test_min_p_keeps_the_tokens_transformers_keeps():
    logits = fixed_logits() / 4  # flat enough that several tokens survive
    sampler = Sampler(seed=0)
    batch = runner().sampling_batch([row(SamplingParams(min_p=0.2, temperature=1.0))])
    kept = {sampler(logits, batch)[0][0] for _ in range(200)}
    warped = MinPLogitsWarper(0.2)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    allowed = set(torch.nonzero(~torch.isinf(warped[0])).flatten().tolist())
    assert kept <= allowed and len(kept) > 1


def test_sampling_follows_the_distribution_with_top_k_and_top_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04] + [0.0] * (VOCAB - 5))
    logits = torch.log(probs).unsqueeze(0).repeat(4000, 1)
    rows = [row(SamplingParams(temperature=1.0))] * 2000 + \
        [row(SamplingParams(temperature=1.0, top_k=2))] * 1000 + \
        [row(SamplingParams(temperature=1.0, top_p=0.8))] * 1000
    tokens, _ = Sampler(seed=1)(logits, runner().sampling_batch(rows))
    counts = torch.bincount(torch.tensor(tokens[:2000]), minlength=VOCAB).float() / 2000
    torch.testing.assert_close(counts, probs, atol=0.03, rtol=0)
    assert set(tokens[2000:3000]) == {0, 1}  # top-k 2
    assert set(tokens[3000:]) == {0, 1, 2}  # the nucleus that reaches 0.8
    top_k_share = sum(t == 0 for t in tokens[2000:3000]) / 1000
    assert abs(top_k_share - 0.5 / 0.75) < 0.05
