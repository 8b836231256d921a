"""Speculative decoding: propose k tokens cheaply, verify them in one pass of the target model.

    config.py     SpeculativeConfig: what `speculative_config={...}` may hold (pure Python)
    proposer.py   the Proposer interface and which requests may speculate (pure Python)
    ngram.py      prompt lookup: propose what followed the last n tokens earlier in the request
    verify.py     exact acceptance of the drafts against the target's logits (torch)
    (the draft model runs in the worker: worker/draft_runner.py)

The scheduler schedules a speculating request's last token and its drafts as one short chunk;
the runner scores every position, keeps the longest accepted run plus one token, and proposes
the next drafts; the scheduler rolls back the rest. docs/spec_decode.md is the user's page.
"""

from __future__ import annotations

from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.proposer import Proposer


def make_proposer(config: SpeculativeConfig | None) -> Proposer | None:
    """The worker's proposer for `config` (None: no speculation, or a draft model, which the
    worker runs itself: worker/draft_runner.py)."""
    if config is None or config.model is not None:
        return None
    from pagedllm.spec_decode.ngram import NgramProposer  # numpy, only when asked for

    return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_max,
                         config.prompt_lookup_min)
