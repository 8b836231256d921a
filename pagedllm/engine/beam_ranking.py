"""Beam search with transformers' semantics: the parameters, the results, and the ranking.

Each step every live beam offers its top 2W continuations (W = beam_width). Candidates are ranked
by cumulative logprob; a candidate ending in EOS among the top W becomes a finished hypothesis
scored `cum_logprob / generated_len ** length_penalty`; the W best others live on. The search
ends after max_tokens steps or when no live beam can beat the W finished ones, and the best W
hypotheses come back, best first. engine/beam_search.py runs it inside the engine, with beams as
requests that fork from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# generated_len ** length_penalty must stay a finite float for any context (8192**10 ~ 1e39)
MAX_LENGTH_PENALTY = 10.0

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
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise ValueError(f"length_penalty must be in [-{MAX_LENGTH_PENALTY}, "
                             f"{MAX_LENGTH_PENALTY}], got {self.length_penalty}")
        if self.temperature != 0:
            raise ValueError("beam search is deterministic: temperature must be 0")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    score: float = 0.0
    parent: BeamSearchSequence | None = field(default=None, repr=False)  # during a step only


def beam_score(cum_logprob: float, generated: int, length_penalty: float) -> float:
    """transformers' ranking of finished hypotheses: length-normalised log-likelihood."""
    return cum_logprob / max(generated, 1) ** length_penalty


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
        return beam_score(beam.cum_logprob, len(beam.tokens) - self.prompt_len, self.length_penalty)

    def advance(self, candidates: list[tuple[float, BeamSearchSequence, int]],
                eos_token_id: int | None) -> None:
        """candidates: (cum_logprob, parent beam, token), any order."""
        candidates.sort(key=lambda c: c[0], reverse=True)
        live, self.live_in_top = [], []
        for rank, (cum, parent, token) in enumerate(candidates[: 2 * self.width]):
            beam = BeamSearchSequence(parent.tokens + [token], cum, parent=parent)
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
        beam.parent = None
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

