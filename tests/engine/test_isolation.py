"""One request's bad data ends that request alone: the step goes on and every other request
finishes with the same tokens as without it (issue 16, isolation inside the step).

Faults are injected at each stage of the step for one marked request (its seed, which greedy
sampling ignores, is the mark), and the issue's own reproductions are replayed as they came."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, make_llm, worker_of

from pagedllm import SamplingParams
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.engine.beam_ranking import BeamSearchParams, BeamState
from pagedllm.engine.output_processor import SequenceState
from pagedllm.worker import model_runner

MARK = 424242
GOOD = SamplingParams(temperature=0, max_tokens=12)
BAD = SamplingParams(temperature=0, max_tokens=12, seed=MARK)


class InjectedFault(RuntimeError):
    pass


def run(engine, bad_params=BAD, bad_prompt=PROMPTS[3], beam: BeamSearchParams | None = None):
    """Three good requests beside one bad one (a beam search when `beam` is given)."""
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"good{i}", prompt, GOOD)
    if beam is not None:
        engine.add_beam_search("bad", bad_prompt, beam)
    else:
        engine.add_request("bad", bad_prompt, bad_params)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


@pytest.fixture(scope="module")
def expected():
    outputs = make_llm().generate(PROMPTS[:3], GOOD, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def assert_only_bad_failed(finals, expected):
    assert [list(finals[f"good{i}"].outputs[0].token_ids) for i in range(3)] == expected
    assert {c.finish_reason for c in finals["bad"].outputs} == {"error"}


def fault_in_prefix_hashing(monkeypatch):
    real = KVCacheManager.block_hashes

    def hashes(self, request):
        if request.sampling_params.seed == MARK:
            raise InjectedFault("hashing")
        return real(self, request)

    monkeypatch.setattr(KVCacheManager, "block_hashes", hashes)


def fault_in_sampling_setup(monkeypatch):
    real = model_runner.banned_tokens

    def banned(s):
        if s.sampling_params.seed == MARK:
            raise InjectedFault("sampling set-up")
        return real(s)

    monkeypatch.setattr(model_runner, "banned_tokens", banned)


def fault_in_output_processing(monkeypatch):
    real = SequenceState.update

    def update(self, output):
        if self.params.seed == MARK and self.token_ids:  # after its first token
            raise InjectedFault("detokenizing")
        return real(self, output)

    monkeypatch.setattr(SequenceState, "update", update)


@pytest.mark.parametrize("inject", [fault_in_prefix_hashing, fault_in_sampling_setup,
                                    fault_in_output_processing])
def test_a_fault_at_each_stage_ends_only_its_request(llm, expected, monkeypatch, inject):
    if inject is fault_in_sampling_setup:
        worker_of(llm)  # the fault is injected into this process's worker
    inject(monkeypatch)
    assert_only_bad_failed(run(llm.llm_engine), expected)


def test_a_fault_in_beam_scoring_ends_only_its_search(llm, expected, monkeypatch):
    real = BeamState.advance

    def advance(self, candidates, eos):
        if self.length_penalty == 0.5:
            raise InjectedFault("beam scoring")
        return real(self, candidates, eos)

    monkeypatch.setattr(BeamState, "advance", advance)
    finals = run(llm.llm_engine, beam=BeamSearchParams(beam_width=2, max_tokens=6,
                                                       length_penalty=0.5))
    assert_only_bad_failed(finals, expected)


def test_the_largest_seed_with_siblings_samples(llm):
    """seed 2**64 - 1 with n=2: the sibling's seed (seed + 1) wraps around instead of
    overflowing inside the step (the issue's first reproduction)."""
    params = SamplingParams(temperature=0.8, n=2, seed=2**64 - 1, max_tokens=6)
    (output,) = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert [c.finish_reason for c in output.outputs] == ["length", "length"]


@pytest.mark.parametrize(("make_bad", "message"), [
    (lambda: SamplingParams(seed=2**64), "seed must fit in 64 bits"),
    (lambda: SamplingParams(seed=-(2**63) - 1), "seed must fit in 64 bits"),
    (lambda: BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=-1e308),
     r"length_penalty must be in \[-10.0, 10.0\]"),
], ids=["seed-high", "seed-low", "length_penalty"])
def test_out_of_range_parameters_are_rejected(make_bad, message):
    with pytest.raises(ValueError, match=message):
        make_bad()


@pytest.mark.parametrize(("prompt", "params", "message"), [
    (PROMPTS[0], SamplingParams(top_k=2**63), "top_k must be at most the vocabulary size"),
    ({"prompt": PROMPTS[2], "cache_salt": "\ud800"}, GOOD, "cache_salt must be valid UTF-8"),
], ids=["top_k", "lone-surrogate-salt"])
def test_the_issues_reproductions_are_rejected_at_intake(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.llm_engine.add_request("bad", prompt, params)
    assert not llm.llm_engine.has_unfinished_requests()
