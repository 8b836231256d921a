"""The runner of a pooling model: one forward pass per request over its whole prompt, then a
pooled result instead of a sampled token.

The scheduler batches pooling requests under the same token budget as generation, with one
difference: a pooling prompt is not split across steps (core/scheduler.py), except a causal
decoder's under last-token pooling, whose earlier chunks only fill the paged KV cache. Then:

    encoder (BERT)   model.encode(ids, positions, token types, sequence lengths):
                     bidirectional attention, no KV cache read or written
    decoder          the ordinary paged forward pass (causal), its last hidden states

and the Pooler (model/layers/pooler.py) turns each sequence's rows into its result. The request
ends in the same step, and the scheduler frees its blocks at once.
"""

from __future__ import annotations

import torch

from pagedllm.core.step_io import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from pagedllm.model.layers.pooler import Pooler, PoolingRow
from pagedllm.worker.model_runner import ModelRunner, batch_order


class PoolingRunner(ModelRunner):
    def __init__(self, *args, pooler: Pooler, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pooler = pooler

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if not scheduler_output.scheduled:
            return ModelRunnerOutput([], [])
        rows = batch_order(scheduler_output.scheduled)
        hidden = self._hidden_states(scheduler_output.scheduled, rows)
        ending = pooling_rows(rows)  # a chunk before a prompt's last is only computed
        pooled = self.pooler(hidden, [row for _, row in ending]) if ending else []
        return ModelRunnerOutput([], [], pooled={s.request_id: result for (s, _), result
                                                 in zip(ending, pooled)})

    def _hidden_states(self, scheduled: list[ScheduledRequest],
                       rows: list[ScheduledRequest]) -> torch.Tensor:
        if not getattr(self.model, "is_encoder", False):
            return self.forward(self.prepare_inputs(scheduled))
        ids = [t for s in rows for t in s.token_ids]
        positions = [p for s in rows for p in range(len(s.token_ids))]
        token_types = [t for s in rows for t in token_type_ids(s)]
        return self.model.encode(self._tensor(ids), self._tensor(positions),
                                 self._tensor(token_types), [len(s.token_ids) for s in rows])


def token_type_ids(row: ScheduledRequest) -> list[int]:
    """BERT's segment of each token: 1 for a pair's second text, else 0."""
    types = row.pooling_params.token_type_ids
    return types if types is not None else [0] * len(row.token_ids)


def pooling_rows(rows: list[ScheduledRequest]) -> list[tuple[ScheduledRequest, PoolingRow]]:
    """The rows that end their prompt this step, with where they are in the flat batch."""
    result, start = [], 0
    for s in rows:
        if s.sample:
            result.append((s, PoolingRow(start, len(s.token_ids), s.pooling_params)))
        start += len(s.token_ids)
    return result
