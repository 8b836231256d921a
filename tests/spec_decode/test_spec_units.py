"""Speculative decoding's pure parts: the config, the n-gram proposer, and the scheduler's
verify chunk and rollback driven by a fake runner (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm.config import EngineArgs, SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.step_io import ModelRunnerOutput
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram import NgramProposer, last_earlier_match
from pagedllm.spec_decode.proposer import ProposalInputs, may_speculate

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}


# ---- config -------------------------------------------------------------------------------------
def test_config_from_dict_and_json_text():
    config = SpeculativeConfig.parse(NGRAM)
    assert (config.method, config.num_speculative_tokens) == ("ngram", 4)
    assert (config.prompt_lookup_max, config.prompt_lookup_min) == (4, 2)
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2}') == \
        SpeculativeConfig("ngram", 2, 4, 2)
    assert EngineArgs(speculative_config=NGRAM).speculative_config == config
    draft = SpeculativeConfig.parse({"model": "/some/draft", "num_speculative_tokens": 3})
    assert (draft.method, draft.model, draft.num_lookahead_tokens) == ("draft_model",
                                                                      "/some/draft", 3)
    assert config.num_lookahead_tokens == 0


def test_draft_model_refuses_what_it_cannot_serve_yet():
    draft = {"model": "/some/draft", "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="preemption_mode='swap' is not supported"):
        EngineArgs(speculative_config=draft, preemption_mode="swap")
    with pytest.raises(ValueError, match="enable_lora is not supported"):
        EngineArgs(speculative_config=draft, enable_lora=True)


@pytest.mark.parametrize(("value", "message"), [
    ({"method": "medusa", "num_speculative_tokens": 2}, "unknown method 'medusa'"),
    ({"num_speculative_tokens": 2}, "unknown method None"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be in"),
    ({"method": "ngram", "num_speculative_tokens": -3}, "num_speculative_tokens must be in"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": "4"}, "must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
      "prompt_lookup_max": 2}, "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown keys"),
    ("{not json", "not valid JSON"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "a draft model needs 'model'"),
    ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "a draft model needs"),
    ({"model": 3, "num_speculative_tokens": 2}, "model must be a path"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_configs_name_the_problem(value, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(speculative_config=value)


def test_parallel_ranks_are_refused():
    with pytest.raises(ValueError, match="more than one rank"):
        EngineArgs(speculative_config=NGRAM, tensor_parallel_size=2)


def test_pooling_runner_refuses_speculation():
    with pytest.raises(ValueError, match="runner='pooling' makes no tokens"):
        EngineArgs(speculative_config=NGRAM, runner="pooling")


def test_cli_flag_parses_json():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']))
    assert args.speculative_config.num_speculative_tokens == 3


# ---- n-gram proposer ----------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_match():
    proposer = NgramProposer(3, lookup_max=3, lookup_min=1)
    #            0  1  2  3  4  5  6  7  8  9
    tokens = [5, 1, 2, 9, 9, 1, 2, 7, 8, 1, 2]
    # the suffix (1, 2) occurs at 1 and 5; the latest (5) is followed by 7 8 1
    assert proposer.propose([ProposalInputs(tokens, 8)]) == [[7, 8, 1]]
    assert proposer.propose([ProposalInputs(tokens, 2)]) == [[7, 8]]  # max_drafts caps it


def test_ngram_prefers_the_longest_suffix():
    proposer = NgramProposer(2, lookup_max=3, lookup_min=1)
    # suffix (4, 1, 2) occurs once, at 0 (followed by 3); (1, 2) alone last occurs at 5 (-> 6)
    tokens = [4, 1, 2, 3, 0, 1, 2, 6, 4, 1, 2]
    assert proposer.propose([ProposalInputs(tokens, 8)]) == [[3, 0]]


def test_ngram_needs_the_minimum_length_and_a_following_token():
    proposer = NgramProposer(2, lookup_max=3, lookup_min=2)
    assert proposer.propose([ProposalInputs([1, 2, 3, 4], 8)]) == [[]]  # no 2-gram repeats
    assert proposer.propose([ProposalInputs([7], 8)]) == [[]]
    assert proposer.propose([ProposalInputs([3, 3, 3], 8)]) == [[3]]  # (3, 3) at 0 -> 3
    assert last_earlier_match(np.array([1, 2, 1, 2]), 2) == 0


def test_requests_whose_distribution_needs_each_token_do_not_speculate():
    assert may_speculate(SamplingParams(temperature=0.5, top_k=5, logprobs=2), 0)
    assert not may_speculate(SamplingParams(presence_penalty=0.5), 3)
    assert not may_speculate(SamplingParams(min_tokens=4), 3)
    assert may_speculate(SamplingParams(min_tokens=4), 4)
    assert not may_speculate(SamplingParams(
        structured_outputs=StructuredOutputsParams(regex="a+")), 0)


# ---- scheduler: the verify chunk and the rollback -----------------------------------------------
def make_scheduler(num_blocks=16, block_size=4, budget=64):
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(8, budget, 256), KVCacheManager(pool, block_size)), pool


def test_drafts_are_scheduled_after_the_last_token_and_rolled_back():
    scheduler, pool = make_scheduler()
    request = Request("a", list(range(10, 16)), SamplingParams(ignore_eos=True), max_tokens=20)
    scheduler.add_request(request)
    out = scheduler.schedule()  # the prompt: 6 tokens, 2 blocks
    scheduler.update_from_output(out, ModelRunnerOutput(
        ["a"], [50], draft_token_ids={"a": [51, 52, 53, 54, 55]}))
    assert request.spec_token_ids == [51, 52, 53, 54, 55]

    out = scheduler.schedule()
    (row,) = out.scheduled
    assert row.token_ids == [50, 51, 52, 53, 54, 55] and row.spec_token_ids == [51, 52, 53, 54, 55]
    assert row.start_position == 6 and row.sample and out.num_scheduled_tokens == 6
    assert len(row.block_ids) == 3  # positions 6..11
    # two drafts accepted, then a correction: 50 51 52 + 99
    scheduler.update_from_output(out, ModelRunnerOutput(
        ["a"], [99], accepted_token_ids={"a": [51, 52]}))
    assert request.output_token_ids == [50, 51, 52, 99]
    assert request.num_computed_tokens == 9  # prompt + 50 51 52; 99 is computed next
    assert len(scheduler.kv.block_ids("a")) == 3  # positions 0..8
    assert scheduler.spec_decoding.num_accepted_per_position == [1, 1, 0, 0, 0]

    out = scheduler.schedule()  # no drafts now: a plain decode
    assert out.scheduled[0].token_ids == [99] and not out.scheduled[0].spec_token_ids
    scheduler.update_from_output(out, ModelRunnerOutput(
        ["a"], [60], draft_token_ids={"a": [61, 62]}))
    out = scheduler.schedule()  # 60 61 62 at positions 10..12: a fourth block
    assert len(out.scheduled[0].block_ids) == 4
    scheduler.update_from_output(out, ModelRunnerOutput(["a"], [70]))  # none accepted
    assert request.num_computed_tokens == 11 and len(scheduler.kv.block_ids("a")) == 3
    assert pool.num_free_blocks == 16 - 3
    # the cached blocks cover accepted tokens only
    for block in pool.blocks:
        assert block.block_hash is None or block.block_id in scheduler.kv.block_ids("a")[:2]
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert pool.num_free_blocks == 16


def test_drafts_never_run_past_max_tokens_or_the_budget():
    scheduler, _ = make_scheduler(budget=8)
    request = Request("a", [1, 2, 3], SamplingParams(ignore_eos=True), max_tokens=4)
    scheduler.add_request(request)
    scheduler.update_from_output(scheduler.schedule(), ModelRunnerOutput(
        ["a"], [5], draft_token_ids={"a": [6, 7, 8, 9]}))
    out = scheduler.schedule()  # 1 output so far, 4 allowed: at most 2 drafts (+1 token)
    assert out.scheduled[0].spec_token_ids == [6, 7]
    finished = scheduler.update_from_output(out, ModelRunnerOutput(
        ["a"], [8], accepted_token_ids={"a": [6, 7]}))
    assert finished[0].new_token_ids == [6, 7, 8] and finished[0].finish_reason == "length"

    scheduler.add_request(Request("b", [1, 2, 3, 4, 5, 6], SamplingParams(ignore_eos=True), 50))
    scheduler.add_request(Request("c", [9, 8, 7, 6, 5, 4], SamplingParams(ignore_eos=True), 50))
    out = scheduler.schedule()  # 6 + 2 of c's prompt
    scheduler.update_from_output(out, ModelRunnerOutput(
        ["b"], [5], draft_token_ids={"b": [1] * 10}))
    out = scheduler.schedule()  # b may take 8 - 1 (c's reserved token): 1 + 6 drafts
    assert [len(s.token_ids) for s in out.scheduled] == [7, 1]


def test_a_stop_token_inside_the_accepted_run_ends_it_there():
    scheduler, pool = make_scheduler()
    params = SamplingParams(stop_token_ids=[52])
    request = Request("a", [1, 2, 3], params, max_tokens=20)
    scheduler.add_request(request)
    scheduler.update_from_output(scheduler.schedule(), ModelRunnerOutput(
        ["a"], [50], draft_token_ids={"a": [51, 52, 53]}))
    out = scheduler.schedule()
    (finished,) = scheduler.update_from_output(out, ModelRunnerOutput(
        ["a"], [54], accepted_token_ids={"a": [51, 52, 53]}))
    assert finished.new_token_ids == [51, 52] and finished.stop_reason == 52
    assert request.output_token_ids == [50, 51, 52]
    assert pool.num_free_blocks == 16
