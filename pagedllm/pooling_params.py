"""What a pooling request asks for (PoolingParams) and how a pooling model pools (PoolerConfig).

A pooling request runs one forward pass over its prompt and comes back with a pooled result
instead of generated tokens:

    task       pooled as            then
    embed      the model's pooling  Matryoshka truncation to `dimensions`, L2 normalisation
    encode     the model's pooling  nothing: the raw hidden states (ALL: one row per token)
    classify   the classifier head  softmax over the labels (sigmoid for one label)
    score      the classifier head  sigmoid of the single logit (a cross-encoder's relevance)

Plain data, no torch: the records cross from the front-end to the worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pagedllm.utils import json_object_option

POOLING_TYPES = ("CLS", "MEAN", "LAST", "ALL")
POOLING_TASKS = ("embed", "encode", "classify", "score")
RUNNERS = ("auto", "generate", "pooling")


@dataclass(slots=True)
class PoolingParams:
    task: str = "embed"
    dimensions: int | None = None  # embed: keep the first `dimensions` (Matryoshka models)
    normalize: bool | None = None  # embed: L2-normalise (None: the model's default)
    pooling_type: str | None = None  # embed/encode: CLS, MEAN, LAST or ALL (None: the model's)
    use_activation: bool = True  # classify/score: softmax or sigmoid (False: raw logits)
    # set by the input processor for a (query, document) pair: BERT's segment of each token
    token_type_ids: list[int] | None = None
    # set by the input processor: must the prompt run in one step (bidirectional attention, or
    # a pooling over all of its tokens)? A causal model's last-token pooling may run in chunks.
    whole_prompt: bool = True

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(f"pooling task must be one of {POOLING_TASKS}, got {self.task!r}")
        if self.pooling_type is not None:
            self.pooling_type = self.pooling_type.upper()
            if self.pooling_type not in POOLING_TYPES:
                raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got "
                                 f"{self.pooling_type!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool)
                                            or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")

    def clone(self) -> PoolingParams:
        return dataclasses.replace(self)


@dataclass(slots=True)
class PoolerConfig:
    """How the model pools (from sentence-transformers' files, the architecture, or
    --pooler-config)."""

    pooling_type: str = "LAST"
    normalize: bool = True  # the default of embed requests
    # Matryoshka: the sizes `dimensions` may take ([] with matryoshka True: any size up to the
    # hidden size); a model that declares none refuses `dimensions`
    matryoshka: bool = False
    matryoshka_dimensions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pooling_type = str(self.pooling_type).upper()
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got "
                             f"{self.pooling_type!r}")
        if self.matryoshka_dimensions:
            self.matryoshka = True

    def merged(self, overrides: dict) -> PoolerConfig:
        """This config with the user's --pooler-config keys over it (unknown keys refused)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"--pooler-config has unknown keys {unknown}; known: "
                             f"{sorted(names)}")
        return PoolerConfig(**(dataclasses.asdict(self) | overrides))

    def check_dimensions(self, dimensions: int | None, hidden_size: int) -> None:
        if dimensions is None:
            return
        if not self.matryoshka:
            raise ValueError("this model does not support Matryoshka representations: "
                             "'dimensions' cannot be set (declare them with --pooler-config "
                             "'{\"matryoshka_dimensions\": [...]}' if the model was trained so)")
        allowed = self.matryoshka_dimensions
        if allowed and dimensions not in allowed:
            raise ValueError(f"dimensions must be one of {allowed} for this model, got "
                             f"{dimensions}")
        if dimensions > hidden_size:
            raise ValueError(f"dimensions ({dimensions}) exceeds the embedding size "
                             f"({hidden_size})")


def parse_pooler_config(value: str | dict | None) -> dict:
    """--pooler-config: a JSON object (or a dict from Python), e.g. {"pooling_type": "MEAN"}."""
    return {} if value is None else json_object_option(value, "pooler_config")
