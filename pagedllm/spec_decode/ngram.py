"""Prompt lookup (n-gram) proposals: find the sequence's last n tokens earlier in its own prompt
or output and propose what followed them there. Longest n first (prompt_lookup_max down to
prompt_lookup_min), the most recent earlier occurrence of that n-gram. Costs no model pass, so
it pays whenever the answer copies from the context (quoting, editing code, summarising)."""

from __future__ import annotations

import numpy as np

from pagedllm.spec_decode.proposer import ProposalInputs, Proposer


class NgramProposer(Proposer):
    def __init__(self, num_speculative_tokens: int, lookup_max: int, lookup_min: int) -> None:
        self.k = num_speculative_tokens
        self.lookup_max = lookup_max
        self.lookup_min = lookup_min

    def propose(self, inputs: list[ProposalInputs]) -> list[list[int]]:
        return [self.propose_one(np.asarray(i.token_ids, dtype=np.int64),
                                 min(self.k, i.max_drafts)) for i in inputs]

    def propose_one(self, tokens: np.ndarray, k: int) -> list[int]:
        if k < 1:
            return []
        for n in range(min(self.lookup_max, len(tokens) - 1), self.lookup_min - 1, -1):
            start = last_earlier_match(tokens, n)
            if start is not None:
                return tokens[start + n : start + n + k].tolist()
        return []


def last_earlier_match(tokens: np.ndarray, n: int) -> int | None:
    """Start of the latest occurrence of the last n tokens that ends before the last token
    (so at least one token follows it), or None."""
    suffix = tokens[-n:]
    # candidate starts: the first token matches, and the whole n-gram ends before the end
    starts = np.flatnonzero(tokens[: len(tokens) - n] == suffix[0])
    for offset in range(1, n):
        if not len(starts):
            return None
        starts = starts[tokens[starts + offset] == suffix[offset]]
    return int(starts[-1]) if len(starts) else None
