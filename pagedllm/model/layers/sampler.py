"""Batched sampling: every row of the logits has its own temperature, top-k, top-p and seed.

Sampling is by inverse CDF: one uniform number u per row, and the token whose cumulative
probability interval holds u * total. One random draw per row (not one per vocabulary entry)
keeps it cheap on a CPU; rows with a seed draw u from their own generator, so a seeded request
gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.logprobs import TokenLogprobs
from pagedllm.ops.cpu import kernels_for


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1), through the C++ kernel on CPU rows (ATen's one-row
    reduction over a vocabulary took ~0.3 ms per token, a few percent of a decode step)."""
    ops = kernels_for(logits)
    if ops is not None and logits.dim() == 2 and logits.is_contiguous() and logits.shape[1] > 0:
        return ops.argmax(logits)
    return logits.argmax(dim=-1)


@dataclass
class Penalties:
    """Per-row penalty strengths, and which tokens each row has seen."""

    presence: torch.Tensor  # [rows]
    frequency: torch.Tensor  # [rows]
    repetition: torch.Tensor  # [rows]
    output_counts: torch.Tensor  # [rows, vocab] occurrences in the generated tokens
    prompt_mask: torch.Tensor  # [rows, vocab] bool: appears in the prompt


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [rows], 0 where greedy
    top_k: torch.Tensor  # [rows] int, 0 = off
    top_p: torch.Tensor  # [rows]
    min_p: torch.Tensor  # [rows]
    generators: list[torch.Generator | None]  # per row: its own, or None for the shared one
    banned: list[list[int]]  # per row: tokens forbidden this step (min_tokens, bad words)
    num_logprobs: list[int | None]
    all_greedy: bool
    needs_top_k_or_p: bool
    needs_min_p: bool
    allowed: list[list[int] | None] | None = None  # per row: the only tokens it may sample
    logit_bias: tuple[list[int], list[int], list[float]] | None = None  # rows, ids, values
    penalties: Penalties | None = None


class Sampler:
    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch):
        if is_plain_greedy(batch):  # argmax is the same in the model's dtype: skip the copy
            return argmax(logits).tolist(), None
        logits = logits.float()
        logprob_rows = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
        # Logprobs are the model's own distribution, before any processing (vLLM's default).
        raw_logprobs = torch.log_softmax(logits, dim=-1) if logprob_rows else None
        logits = apply_logits_processors(logits, batch)
        sampled = self._sample(logits, batch)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = self.gather_logprobs(raw_logprobs, sampled, batch.num_logprobs)
        return sampled.tolist(), logprobs

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy = argmax(logits)
        if batch.all_greedy:
            return greedy
        sampled = self._inverse_cdf(sampling_probs(logits, batch), batch.generators)
        return torch.where(batch.temperature == 0, greedy, sampled)

    def _inverse_cdf(self, probs: torch.Tensor, generators) -> torch.Tensor:
        uniform = torch.rand(probs.shape[0], generator=self.generator, device=probs.device)
        for row, generator in enumerate(generators):
            if generator is not None:
                uniform[row] = torch.rand(1, generator=generator, device=probs.device)[0]
        return pick(probs, uniform)

    def uniform(self, count: int, generator: torch.Generator | None,
                device: torch.device) -> torch.Tensor:
        """`count` uniform draws from a row's own generator, else from the shared one."""
        return torch.rand(count, generator=generator or self.generator, device=device)

    @staticmethod
    def gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor,
                         num_logprobs: list[int | None]) -> list[TokenLogprobs | None]:
        k_max = max(k for k in num_logprobs if k is not None)
        chosen = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
        top_values, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
        result: list[TokenLogprobs | None] = []
        for row, k in enumerate(num_logprobs):
            if k is None:
                result.append(None)
                continue
            ids = [int(sampled[row])] + (top_ids[row, :k].tolist() if k else [])
            values = [float(chosen[row])] + (top_values[row, :k].tolist() if k else [])
            result.append(TokenLogprobs(ids, values, int(ranks[row])))
        return result


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution each row samples from: temperature, top-k and top-p, then min-p (rows
    whose temperature is 0 get their softmax at temperature 1; they take the argmax)."""
    is_greedy = batch.temperature == 0
    logits = logits / torch.where(is_greedy, 1.0, batch.temperature).unsqueeze(1)
    if batch.needs_top_k_or_p:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    probs = torch.softmax(logits, dim=-1)
    if batch.needs_min_p:
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def pick(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: for each row the token whose cumulative weight interval holds uniform *
    total (the weights need not sum to 1)."""
    cdf = weights.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    # the first token whose cumulative probability exceeds the target; zero-probability
    # tokens add nothing to the sum and so can never be the first to exceed it
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return picked.clamp_(max=weights.shape[-1] - 1)


def is_plain_greedy(batch: SamplingBatch) -> bool:
    """Greedy rows only, no logprobs and nothing that changes logits."""
    return (batch.all_greedy and all(k is None for k in batch.num_logprobs)
            and batch.allowed is None and not any(batch.banned)
            and batch.logit_bias is None and batch.penalties is None)


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """allowed_token_ids, banned tokens, logit_bias, then the penalties; in place."""
    if batch.allowed is not None:
        for row, allowed in enumerate(batch.allowed):
            if allowed is not None:
                keep = logits[row, allowed].clone()
                logits[row] = float("-inf")
                logits[row, allowed] = keep
    for row, token_ids in enumerate(batch.banned):
        if token_ids:
            logits[row, token_ids] = float("-inf")
    if batch.logit_bias is not None:
        rows, ids, values = batch.logit_bias
        logits.index_put_((torch.tensor(rows), torch.tensor(ids)),
                          torch.tensor(values, dtype=logits.dtype, device=logits.device),
                          accumulate=True)
    if batch.penalties is not None:
        apply_penalties(logits, batch.penalties)
    return logits


def apply_penalties(logits: torch.Tensor, p: Penalties) -> None:
    """Repetition (transformers: seen in prompt or output; positive logits divided, negative
    multiplied), then frequency and presence (OpenAI: generated tokens only)."""
    seen = p.prompt_mask | (p.output_counts > 0)
    factor = p.repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / factor, logits * factor)
    logits.copy_(torch.where(seen, penalized, logits))
    logits -= p.frequency.unsqueeze(1) * p.output_counts
    logits -= p.presence.unsqueeze(1) * (p.output_counts > 0).to(logits.dtype)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    outside_k = (top_k.unsqueeze(1) > 0) & (ranks >= top_k.unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(outside_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all better tokens
    # The top token always has mass_before 0; rows with top_p 1 keep everything (rounding).
    outside_p = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
