"""Beam search inside the engine: beams are requests that fork from each other.

A beam search request starts as one engine request that computes its prompt and then one token
per step, asking for the top 2W logprobs (the token it samples is only a placeholder). Once every
live beam of a search has produced its logprobs, BeamState ranks the candidates (transformers'
rules) and the chosen continuations are applied to the scheduler:

    first continuation of a beam  -> the beam's own request, its placeholder token replaced
    further continuations         -> forks of it: all blocks shared by count, the partial last
                                     block copied on write when a fork first appends to it
    beams nobody continues        -> aborted, their blocks freed

The placeholder is the one token whose K/V is not computed yet, so replacing it is free, and the
search runs in the normal step loop beside every other request.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pagedllm.core.request import RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.step_io import EngineCoreOutput, TokenLogprobs
from pagedllm.engine.beam_ranking import BeamSearchParams, BeamSearchSequence, BeamState
from pagedllm.engine.features import StepFeature
from pagedllm.logger import init_logger
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = init_logger(__name__)

@dataclass(eq=False)
class BeamGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: BeamSearchParams
    state: BeamState
    beams: dict[str, BeamSearchSequence]  # live engine request id -> its beam
    arrived: dict[str, TokenLogprobs] = field(default_factory=dict)
    steps: int = 0
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))


def step_params(params: BeamSearchParams) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=params.max_tokens,
                          logprobs=2 * params.beam_width, ignore_eos=True, detokenize=False)


class BeamSearchManager(StepFeature):
    """A step feature (engine/features.py): after each update it takes the beams' outputs,
    advances the searches and keeps each finished search's result for `take_results`."""

    def __init__(self, scheduler: Scheduler, tokenizer, eos_token_id: int | None) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.groups: dict[str, BeamGroup] = {}
        self._owner: dict[str, BeamGroup] = {}  # engine request id -> its search
        self._results: list[RequestOutput] = []  # searches finished since the last take

    def start(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
              params: BeamSearchParams, first_request_id: str) -> None:
        state = BeamState(len(prompt_token_ids), params.beam_width, params.length_penalty,
                          [BeamSearchSequence(list(prompt_token_ids))])
        group = BeamGroup(request_id, prompt, prompt_token_ids, params, state,
                          {first_request_id: state.live[0]})
        self.groups[request_id] = group
        self._owner[first_request_id] = group

    def owns(self, engine_request_id: str) -> bool:
        return engine_request_id in self._owner

    def owns_search(self, request_id: str) -> bool:
        return request_id in self.groups

    def after_update(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Keep the outputs of other requests; the beams' feed their searches."""
        if not self._owner:
            return outputs
        beams = [o for o in outputs if o.request_id in self._owner]
        rest = [o for o in outputs if o.request_id not in self._owner]
        if beams:
            self._results += self.process(beams)
        return rest

    def take_results(self) -> list[RequestOutput]:
        results, self._results = self._results, []
        return results

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            group = self.groups.pop(request_id, None)
            if group is not None:
                self._drop(group, list(group.beams))

    def process(self, outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        """Take the beams' logprobs; advance every search whose live beams all reported."""
        ready = []
        for output in outputs:
            group = self._owner[output.request_id]
            group.arrived[output.request_id] = output.new_logprobs[0]
            if group.arrived.keys() == group.beams.keys() and group not in ready:
                ready.append(group)
        return [result for group in ready if (result := self._advance_alone(group)) is not None]

    def _advance_alone(self, group: BeamGroup) -> RequestOutput | None:
        """Advance one search; if its own parameters break the scoring, it alone ends, with
        finish_reason "error"."""
        try:
            return self._advance(group)
        except Exception as exc:
            logger.error("beam search %s ended with an error: %s: %s", group.request_id,
                         type(exc).__name__, exc)
            self._drop(group, list(group.beams))
            self.groups.pop(group.request_id, None)
            return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids,
                                 [CompletionOutput(0, "", [], finish_reason="error")],
                                 finished=True)

    def _advance(self, group: BeamGroup) -> RequestOutput | None:
        owner = {id(beam): request_id for request_id, beam in group.beams.items()}
        candidates = []
        for request_id, beam in group.beams.items():
            entry = group.arrived[request_id]
            for token, logprob in dict(zip(entry.token_ids, entry.logprobs)).items():
                candidates.append((beam.cum_logprob + logprob, beam, token))
        group.arrived.clear()
        group.steps += 1
        eos = None if group.params.ignore_eos else self.eos_token_id
        group.state.advance(candidates, eos)
        gone = any(not self.scheduler.is_unfinished(r) for r in group.beams)  # max_model_len
        if group.state.done or group.steps >= group.params.max_tokens or gone:
            return self._finish(group)
        self._apply(group, owner)
        return None

    def _apply(self, group: BeamGroup, owner: dict[int, str]) -> None:
        continued: dict[str, BeamSearchSequence] = {}
        for beam in group.state.live:
            parent_id = owner[id(beam.parent)]
            beam.parent = None
            request_id = parent_id
            if parent_id in continued:
                request_id = f"{group.request_id}#beam{next(group.ids)}"
                self.scheduler.fork(parent_id, request_id)
                self._owner[request_id] = group
            self.scheduler.replace_last_token(request_id, beam.tokens[-1])
            continued[request_id] = beam
        self._drop(group, [r for r in group.beams if r not in continued])
        group.beams = continued

    def _drop(self, group: BeamGroup, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        for request_id in request_ids:
            self._owner.pop(request_id, None)

    def _finish(self, group: BeamGroup) -> RequestOutput:
        self._drop(group, list(group.beams))
        self.groups.pop(group.request_id, None)
        prompt_len = len(group.prompt_token_ids)
        completions = []
        for index, seq in enumerate(group.state.result()):
            generated = seq.tokens[prompt_len:]
            if seq.finish_reason == "stop" and not group.params.include_stop_str_in_output:
                generated = generated[:-1]
            text = (self.tokenizer.decode(generated, skip_special_tokens=True)
                    if self.tokenizer is not None else "")
            completions.append(CompletionOutput(index, text, seq.tokens[prompt_len:],
                                                cumulative_logprob=seq.cum_logprob,
                                                finish_reason=seq.finish_reason))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions,
                             finished=True)
