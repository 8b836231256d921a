"""What every proposer gives the engine, and which requests may speculate at all.

A proposer sees each speculating sequence's tokens so far (prompt and output) and returns up to
`k` draft tokens for it (none is fine: that sequence then decodes one token as usual). That is
all the runner needs from it, so a draft model, an n-gram lookup or an EAGLE-style head that
reads the target's hidden states (added to `ProposalInputs` when one exists) fit behind it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from pagedllm.sampling_params import SamplingParams


@dataclass(slots=True)
class ProposalInputs:
    """One sequence to propose for: its tokens so far, and the most drafts it may take."""

    token_ids: Sequence[int]  # prompt + output, the newest last
    max_drafts: int


class Proposer(ABC):
    @abstractmethod
    def propose(self, inputs: list[ProposalInputs]) -> list[list[int]]:
        """Drafts for each sequence, at most its max_drafts each (in the inputs' order)."""


def may_speculate(params: SamplingParams, num_output_tokens: int) -> bool:
    """Can a verify pass score this sequence's drafts exactly as one-token steps would? Not
    when a token's distribution depends on the tokens before it in ways the drafts would have
    to be threaded through: penalties (counts of earlier outputs), bad words (the last tokens),
    min_tokens not reached yet (stop tokens banned by position), or a grammar (its matcher
    advances per token). Such sequences decode one token per step; the others speculate."""
    return not (params.has_penalties or params.bad_words_token_ids
                or num_output_tokens < params.min_tokens
                or params.structured_outputs is not None)
