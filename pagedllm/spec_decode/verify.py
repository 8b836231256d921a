"""Exact verification of draft tokens against the target model's logits.

A sequence with drafts d_1..d_k has k + 1 logits rows: row i is the target's distribution p_i
for the token after d_1..d_i (row 0: after its last real token). The rule keeps the output
distribution exactly the target's:

    greedy (temperature 0)   accept d_{i+1} while it is the argmax of row i; then the argmax of
                             the first row that disagreed (or of row k: the bonus token)
    temperature > 0          accept d_{i+1} with probability min(1, p_i(d) / q_i(d)); at the
                             first rejection draw from the normalised max(0, p_i - q_i), else the
                             bonus token from p_k

p_i is the row's sampling distribution after every processor the plain sampler applies
(allowed ids, logit bias, temperature, top-k, top-p, min-p: model/layers/sampler.py), so
speculation samples what one-token steps would. An n-gram proposal has no distribution: q is
one-hot on the draft, so a draft is accepted with probability p_i(d), and on rejection the
draw is from p_i with d taken out. Each sequence draws its k + 1 uniforms from its own
generator when it has a seed, so a seeded request gives the same tokens in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.logprobs import TokenLogprobs
from pagedllm.model.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_logits_processors,
    argmax,
    is_plain_greedy,
    pick,
    sampling_probs,
)


@dataclass(slots=True)
class VerifyResult:
    accepted: list[list[int]]  # per sequence: its drafts that were accepted
    final: list[int]  # per sequence: the token after them (a correction, or the bonus token)
    # per sequence: logprobs of accepted + [final] (None entries where none were asked for)
    logprobs: list[list[TokenLogprobs | None]]


def verify(sampler: Sampler, logits: torch.Tensor, batch: SamplingBatch,
           drafts: list[list[int]],
           draft_probs: list[torch.Tensor | None] | None = None) -> VerifyResult:
    """`logits` and `batch` hold len(d) + 1 rows per sequence, in the order of `drafts`;
    `draft_probs`: each sequence's q, [len(d), vocab], or None where q is one-hot (n-gram)."""
    offsets = _offsets(drafts)
    draft_probs = draft_probs or [None] * len(drafts)
    if is_plain_greedy(batch):
        target = argmax(logits).tolist()
        accepted = [_greedy_run(d, target[o : o + len(d)]) for o, d in zip(offsets, drafts)]
        final = [target[o + len(a)] for o, a in zip(offsets, accepted)]
        return VerifyResult(accepted, final, [[None] * (len(a) + 1) for a in accepted])
    logits = logits.float()
    wants_logprobs = any(k is not None for k in batch.num_logprobs)
    raw = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    logits = apply_logits_processors(logits, batch)
    accepted, final = _accept(sampler, logits, batch, drafts, offsets, draft_probs)
    logprobs = (_logprobs(raw, batch, accepted, final, offsets) if raw is not None
                else [[None] * (len(a) + 1) for a in accepted])
    return VerifyResult(accepted, final, logprobs)


def _offsets(drafts: list[list[int]]) -> list[int]:
    offsets, row = [], 0
    for d in drafts:
        offsets.append(row)
        row += len(d) + 1
    return offsets


def _greedy_run(draft: list[int], target: list[int]) -> list[int]:
    """The drafts up to the first that is not the target's argmax."""
    count = 0
    while count < len(draft) and draft[count] == target[count]:
        count += 1
    return draft[:count]


def _accept(sampler: Sampler, logits: torch.Tensor, batch: SamplingBatch,
            drafts: list[list[int]], offsets: list[int],
            draft_probs: list[torch.Tensor | None]) -> tuple[list[list[int]], list[int]]:
    greedy = argmax(logits).tolist()
    temperature = batch.temperature.tolist()
    probs = None if batch.all_greedy else sampling_probs(logits, batch)
    accepted: list[list[int]] = []
    final: list[int | None] = []
    weights, uniforms, to_draw = [], [], []
    for j, (o, d, q) in enumerate(zip(offsets, drafts, draft_probs)):
        if temperature[o] == 0:
            run = _greedy_run(d, greedy[o : o + len(d)])
            accepted.append(run)
            final.append(greedy[o + len(run)])
            continue
        u = sampler.uniform(len(d) + 1, batch.generators[o], logits.device)
        ids = torch.tensor(d, dtype=torch.long)
        p_draft = probs[torch.arange(o, o + len(d)), ids]
        # u < p(d) / q(d), as u * q(d) < p(d); q(d) is 1 for a one-hot q
        q_draft = q[torch.arange(len(d)), ids] if q is not None else torch.ones_like(p_draft)
        keep = (u[: len(d)] * q_draft < p_draft).tolist()
        count = 0
        while count < len(d) and keep[count]:
            count += 1
        row = probs[o + count]
        if count < len(d):
            row = _residual(row, q[count] if q is not None else None, d[count])
        accepted.append(d[:count])
        final.append(None)
        weights.append(row)
        uniforms.append(u[len(d)])
        to_draw.append(j)
    if to_draw:
        drawn = pick(torch.stack(weights), torch.stack(uniforms)).tolist()
        for j, token in zip(to_draw, drawn):
            final[j] = token
    return accepted, final


def _residual(p: torch.Tensor, q: torch.Tensor | None, draft: int) -> torch.Tensor:
    """max(0, p - q), to be normalised by the draw: for a one-hot q, p without the draft.
    (It is all zero only where p == q, when no draft can be rejected; p then, for safety.)"""
    if q is None:
        row = p.clone()
        row[draft] = 0.0
        return row
    row = (p - q).clamp_(min=0.0)
    return row if bool(row.sum() > 0) else p


def _logprobs(raw: torch.Tensor, batch: SamplingBatch, accepted: list[list[int]],
              final: list[int], offsets: list[int]) -> list[list[TokenLogprobs | None]]:
    """The target's own logprobs (before any processing, as the plain sampler reports) of each
    token a sequence emitted, from the row that produced it."""
    result = []
    for o, a, last in zip(offsets, accepted, final):
        k = batch.num_logprobs[o]
        if k is None:
            result.append([None] * (len(a) + 1))
            continue
        rows = raw[o : o + len(a) + 1]
        tokens = torch.tensor([*a, last], dtype=torch.long, device=raw.device)
        result.append(Sampler.gather_logprobs(rows, tokens, [k] * len(tokens)))
    return result
