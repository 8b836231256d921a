"""A draft model for speculative decoding, run by the worker beside the target.

The draft has its own KV pool per layer, addressed by the target's block tables and slot
mapping (same block ids, same block size), so the scheduler needs no second allocator; the
memory plan counts both pools' bytes per block. Each step:

    sync      the draft runs the step's flat batch as the target did, writing its own K/V for
              every token the target computed (prompt chunks, decodes, verified drafts alike:
              rejected positions are overwritten later, for both models)
    propose   for each sequence that got tokens: k one-token steps of the draft from its newest
              token, each sampled from the draft's distribution q (the request's own sampling
              settings, its generator), into the lookahead slots the scheduler held
              (SchedulerConfig.num_lookahead_tokens); q is kept for the next step's verify

Drafts are proposed from what the draft computed, so prefix-cache hits (blocks hold both
models' K/V) and recompute after preemption need nothing special.
"""

from __future__ import annotations

import dataclasses

import torch

from pagedllm.core.step_io import ScheduledRequest
from pagedllm.model.layers.sampler import apply_logits_processors, argmax, pick, sampling_probs


class DraftRunner:
    def __init__(self, model: torch.nn.Module, kv_caches, num_speculative_tokens: int,
                 max_model_len: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len
        self.probs: dict[str, torch.Tensor] = {}  # sequence id -> q of its drafts, [k, vocab]

    def sync(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata) -> None:
        self.model(input_ids, positions, self.kv_caches, metadata)

    def take_probs(self, sequence_id: str, count: int) -> torch.Tensor | None:
        """q of the first `count` drafts proposed for the sequence (the scheduler may have
        verified fewer than were proposed)."""
        probs = self.probs.pop(sequence_id, None)
        return None if probs is None else probs[:count]

    def forget(self, sequence_ids) -> None:
        for sequence_id in sequence_ids:
            self.probs.pop(sequence_id, None)

    def propose(self, runner, rows: list[tuple[ScheduledRequest, str, int, int]]
                ) -> dict[str, list[int]]:
        """`rows`: (row, sequence id, newest token, its position) per sequence to propose for.
        Returns each sequence's drafts; keeps their q for take_probs."""
        steps = [max(0, min(self.k, self.max_model_len - position - 1))
                 for _, _, _, position in rows]
        drafts: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        tokens = [token for _, _, token, _ in rows]
        for step in range(max(steps, default=0)):
            live = [i for i, n in enumerate(steps) if n > step]
            batch_rows = [dataclasses.replace(
                rows[i][0], token_ids=[tokens[i]], start_position=rows[i][3] + step,
                spec_token_ids=[], sample=True, sample_ids=[rows[i][1]], prompt_token_ids=[],
                output_token_ids=rows[i][0].output_token_ids) for i in live]
            sampled, q = self._step(runner, batch_rows)
            for i, token, row_q in zip(live, sampled, q):
                drafts[i].append(token)
                probs[i].append(row_q)
                tokens[i] = token
        for (_, sequence_id, _, _), row_probs in zip(rows, probs):
            if row_probs:
                self.probs[sequence_id] = torch.stack(row_probs)
        return {sequence_id: d for (_, sequence_id, _, _), d in zip(rows, drafts) if d}

    def _step(self, runner, rows: list[ScheduledRequest]) -> tuple[list[int], list[torch.Tensor]]:
        """One decode of the draft for `rows`: the sampled token and q of each."""
        inputs = runner.prepare_inputs(rows)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        logits = self.model.compute_logits(hidden[inputs.logits_indices]).float()
        batch = runner.sampling_batch(inputs.sampling, inputs.sample_ids)
        logits = apply_logits_processors(logits, batch)
        greedy = argmax(logits)
        probs = sampling_probs(logits, batch)
        uniform = torch.stack([runner.sampler.uniform(1, g, logits.device)[0]
                               for g in batch.generators])
        sampled = torch.where(batch.temperature == 0, greedy, pick(probs, uniform))
        # a greedy row's q is one-hot on its argmax (the verify rule then reduces to greedy's)
        one_hot = torch.nn.functional.one_hot(greedy, probs.shape[-1]).to(probs.dtype)
        q = torch.where((batch.temperature == 0).unsqueeze(1), one_hot, probs)
        return sampled.tolist(), list(q)
