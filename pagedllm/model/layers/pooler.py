"""From a flat batch of last hidden states to one result per sequence.

    pooling   CLS   the sequence's first row        MEAN  the average of its rows
              LAST  its last row                    ALL   every row (a matrix)
    then, by task:
              embed     keep the first `dimensions` features (Matryoshka), L2-normalise
              encode    as pooled
              classify  the model's head; softmax over the labels (sigmoid for one label)
              score     the model's head; sigmoid of its one logit

Every sequence of the batch is whole (a pooling prompt runs in one step), so a sequence is a
(start, length) run of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.pooling_params import PoolerConfig, PoolingParams


@dataclass(slots=True)
class PoolingRow:
    """One sequence of the flat batch and what it asked for."""

    start: int
    length: int
    params: PoolingParams


def pool_hidden(hidden: torch.Tensor, rows: list[PoolingRow],
                types: list[str]) -> list[torch.Tensor]:
    """Each sequence's pooled rows in float32: a [hidden] vector, or [length, hidden] for ALL."""
    hidden = hidden.float()
    starts = torch.tensor([r.start for r in rows], device=hidden.device)
    lengths = torch.tensor([r.length for r in rows], device=hidden.device)
    first = hidden[starts]
    last = hidden[starts + lengths - 1]
    means = segment_means(hidden, lengths) if "MEAN" in types else None
    pooled = []
    for i, (row, kind) in enumerate(zip(rows, types)):
        if kind == "CLS":
            pooled.append(first[i])
        elif kind == "LAST":
            pooled.append(last[i])
        elif kind == "MEAN":
            pooled.append(means[i])
        else:
            pooled.append(hidden[row.start : row.start + row.length])
    return pooled


def segment_means(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[num_seqs, hidden] mean of each consecutive run of `lengths` rows."""
    return torch.segment_reduce(hidden, "mean", lengths=lengths)


class Pooler:
    """The model's pooling and head, as configured (PoolerConfig)."""

    def __init__(self, model: nn.Module, config: PoolerConfig) -> None:
        self.model = model
        self.config = config

    def __call__(self, hidden: torch.Tensor, rows: list[PoolingRow]) -> list[list]:
        """One result per row, as plain lists."""
        types = [self._pooling_type(r.params) for r in rows]
        pooled = pool_hidden(hidden, rows, types)
        results: list[list] = [[] for _ in rows]
        heads = [i for i, r in enumerate(rows) if r.params.task in ("classify", "score")]
        if heads:
            logits = self.model.classify(torch.stack([pooled[i] for i in heads])
                                         .to(hidden.dtype)).float()
            for i, row_logits in zip(heads, logits):
                results[i] = activate(row_logits, rows[i].params).tolist()
        for i, row in enumerate(rows):
            if row.params.task == "embed":
                results[i] = self._embedding(pooled[i], row.params).tolist()
            elif row.params.task == "encode":
                results[i] = pooled[i].tolist()
        return results

    def _pooling_type(self, params: PoolingParams) -> str:
        if params.task in ("classify", "score"):  # the head was trained on the model's own
            return self.config.pooling_type
        return params.pooling_type or self.config.pooling_type

    def _embedding(self, vector: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        if params.dimensions is not None:
            vector = vector[..., : params.dimensions]
        normalize = self.config.normalize if params.normalize is None else params.normalize
        return F.normalize(vector, p=2, dim=-1) if normalize else vector


def activate(logits: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """A classifier's probabilities: sigmoid for a single label (a cross-encoder's relevance),
    softmax over several."""
    if not params.use_activation:
        return logits
    return torch.sigmoid(logits) if logits.numel() == 1 else torch.softmax(logits, dim=-1)
