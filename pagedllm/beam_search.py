"""Beam search over the engine, with transformers' semantics.

Each step asks the engine for one token per live beam with the top 2W logprobs (W = beam_width).
All beams of a prompt are requests over the same prefix, so the prefix cache hands every full
block to each of them by reference count: the prompt and the shared history are computed once,
only a beam's last partial block is recomputed. Candidates are ranked by cumulative logprob; a
candidate ending in EOS among the top W becomes a finished hypothesis scored
`cum_logprob / generated_len ** length_penalty`; the search ends after max_tokens steps or when no
live beam can beat the W finished ones, and the best W hypotheses come back, best first.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature != 0:
            raise ValueError("beam search is deterministic: temperature must be 0")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    score: float = 0.0


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)


@dataclass
class BeamState:
    """One prompt's search: live beams and finished hypotheses."""

    prompt_len: int
    width: int
    length_penalty: float
    live: list[BeamSearchSequence]
    finished: list[BeamSearchSequence] = field(default_factory=list)
    live_in_top: list[BeamSearchSequence] = field(default_factory=list)
    stopped_early: bool = False
    done: bool = False

    def score(self, beam: BeamSearchSequence) -> float:
        generated = len(beam.tokens) - self.prompt_len
        return beam.cum_logprob / max(generated, 1) ** self.length_penalty

    def advance(self, candidates: list[tuple[float, BeamSearchSequence, int]],
                eos_token_id: int | None) -> None:
        """candidates: (cum_logprob, parent beam, token), any order."""
        candidates.sort(key=lambda c: c[0], reverse=True)
        live, self.live_in_top = [], []
        for rank, (cum, parent, token) in enumerate(candidates[: 2 * self.width]):
            beam = BeamSearchSequence(parent.tokens + [token], cum)
            if token == eos_token_id:
                if rank < self.width:  # only the top W candidates may finish (as in HF)
                    beam.finish_reason = "stop"
                    self._add_finished(beam)
                continue
            if len(live) < self.width:
                live.append(beam)
                if rank < self.width:
                    self.live_in_top.append(beam)
        self.live = live
        self.stopped_early = bool(live) and self._cannot_improve()
        self.done = not live or self.stopped_early

    def _add_finished(self, beam: BeamSearchSequence) -> None:
        beam.score = self.score(beam)
        self.finished.append(beam)
        self.finished.sort(key=lambda b: b.score, reverse=True)
        del self.finished[self.width :]

    def _cannot_improve(self) -> bool:
        """transformers' heuristic (early_stopping=False): stop once the best live beam, scored at
        its current length, is no better than the worst of W finished hypotheses."""
        if len(self.finished) < self.width:
            return False
        return self.finished[-1].score >= self.score(self.live[0])

    def result(self) -> list[BeamSearchSequence]:
        """At max_tokens the live beams among the last step's top W candidates finish too; after
        an early stop none could improve on the finished ones."""
        if not self.stopped_early:
            for beam in self.live_in_top:
                beam.finish_reason = "length"
                self._add_finished(beam)
        return self.finished


class BeamSearch:
    """The search over several prompts, independent of how the engine is driven: ask `pending()`
    for the token lists to extend, run them one token each with `step_params`, hand the top
    logprobs back to `advance()`, until `done`."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams,
                 eos_token_id: int | None) -> None:
        self.params = params
        self.eos = None if params.ignore_eos else eos_token_id
        self.states = [BeamState(len(ids), params.beam_width, params.length_penalty,
                                 [BeamSearchSequence(list(ids))]) for ids in prompts]
        self.steps = 0
        self._asked: list[tuple[BeamState, BeamSearchSequence]] = []

    @property
    def step_params(self):
        from pagedllm.sampling_params import SamplingParams

        return SamplingParams(temperature=0, max_tokens=1, logprobs=2 * self.params.beam_width,
                              ignore_eos=True, detokenize=False)

    @property
    def done(self) -> bool:
        return self.steps >= self.params.max_tokens or all(s.done for s in self.states)

    def pending(self) -> list[list[int]]:
        self._asked = [(state, beam) for state in self.states if not state.done
                       for beam in state.live]
        return [beam.tokens for _, beam in self._asked]

    def advance(self, top_logprobs: list[dict]) -> None:
        """top_logprobs[i]: {token_id: Logprob} for the i-th pending sequence."""
        candidates: dict[int, list] = {id(state): [] for state, _ in self._asked}
        for (state, beam), entries in zip(self._asked, top_logprobs):
            for token, logprob in entries.items():
                candidates[id(state)].append((beam.cum_logprob + logprob.logprob, beam, token))
        for state in {id(s): s for s, _ in self._asked}.values():
            state.advance(candidates[id(state)], self.eos)
        self.steps += 1

    def outputs(self, decode) -> list[BeamSearchOutput]:
        """decode(generated token ids) -> text, or None without a tokenizer."""
        results = []
        for state in self.states:
            sequences = state.result()
            for seq in sequences:
                generated = seq.tokens[state.prompt_len:]
                if seq.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                    generated = generated[:-1]
                seq.text = decode(generated)
            results.append(BeamSearchOutput(sequences))
        return results
