"""Per-request decoding options, validated once when the request is made."""

from __future__ import annotations

import enum
import json as jsonlib
import math
from dataclasses import dataclass, field
from typing import Any


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries all text so far
    DELTA = 1  # every output carries only what is new (streaming)
    FINAL_ONLY = 2  # one output when the request finishes (offline generate)


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_LOGIT_BIAS = 100  # OpenAI's range for logit_bias values


def check_text(text: str, name: str) -> None:
    """ValueError naming `name` unless `text` is valid Unicode: a lone surrogate (which JSON's
    "\\ud800" can carry) cannot be encoded as UTF-8, so no tokenizer or hash could take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} must be valid UTF-8 text: it has a lone surrogate "
                         f"({text[exc.start]!r}) at character {exc.start}") from None


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output to a format; set exactly one of the five (vLLM's names).

    json: a JSON schema (a dict, its JSON text, or a pydantic model class); regex: the whole
    output matches it; choice: the output is one of these strings; grammar: an EBNF grammar
    (GBNF dialect, start rule `root`); json_object: any JSON object.
    The engine compiles it with xgrammar (see docs/structured_outputs.md).
    """

    json: str | dict[str, Any] | type | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # False (the default here, unlike vLLM): JSON comes in one compact layout, `{"a": 1, "b":
    # [2, 3]}`. A small model sampled hot otherwise spends its tokens on runs of whitespace.
    any_whitespace: bool = False
    # The constraint holds only after this text first appears in the output (a reasoning
    # model's `</think>`; the server's --reasoning-parser sets it): the thinking is free.
    start_after: str | None = None

    def __post_init__(self) -> None:
        if self.start_after is not None and (not isinstance(self.start_after, str)
                                             or not self.start_after):
            raise ValueError("structured_outputs.start_after must be a non-empty string")
        if isinstance(self.json, type) and hasattr(self.json, "model_json_schema"):
            self.json = self.json.model_json_schema()  # a pydantic model class
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, "
                             f"grammar or json_object; got {given or 'none'}")
        self._check_values()

    def _check_values(self) -> None:
        if isinstance(self.json, str):
            try:
                self.json = jsonlib.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from exc
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object), got "
                             f"{type(self.json).__name__}")
        if self.choice is not None and (
                not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
            if value is not None:
                check_text(value, f"structured_outputs.{name}")
        for i, choice in enumerate(self.choice or []):
            check_text(choice, f"structured_outputs.choice[{i}]")

    @property
    def kind(self) -> str:
        """Which of the five constraints this is: 'json', 'regex', 'choice', ..."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop; the names and defaults follow vLLM."""

    n: int = 1
    best_of: int | None = None  # sample this many, return the n with the best cumulative logprob
    presence_penalty: float = 0.0  # OpenAI: minus this once a token has appeared in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this per occurrence in the output
    repetition_penalty: float = 1.0  # transformers: divide (or multiply) seen tokens' logits
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice, ...
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine from the model, so that stopping needs no tokenizer: the EOS id, and
    # stop_token_ids plus the generation config's extra end-of-turn ids.
    eos_token_id: int | None = field(default=None, repr=False)
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.best_of is None:
            self.best_of = self.n
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for token_id, bias in (self.logit_bias or {}).items():
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # NaN fails this too
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, "
                                 f"{MAX_LOGIT_BIAS}], got {bias} for token {token_id}")
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.best_of >= self.n, f"best_of ({self.best_of}) must be at least n ({self.n})"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0,
             f"repetition_penalty must be positive, got {self.repetition_penalty}"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
             "allowed_token_ids must not be empty"),
            (self.temperature >= 0, f"temperature must be non-negative, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1 (disable) or at least 1, got {self.top_k}"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"seed must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {self.seed}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (self.logprobs is None or self.logprobs >= 0,
             f"logprobs must be non-negative, got {self.logprobs}"),
            (self.detokenize or not self.stop, "stop strings need detokenize=True"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("stop", "bad_words"):
            for i, text in enumerate(getattr(self, name) or []):
                if not isinstance(text, str):
                    raise ValueError(f"{name}[{i}] must be a string, got {type(text).__name__}")
                check_text(text, f"{name}[{i}]")
        if self.best_of > 1 and self.greedy:
            raise ValueError("n > 1 or best_of > 1 needs sampling: set temperature > 0")

    def tokens_banned_before_min(self) -> list[int]:
        """Ids that may not be sampled while fewer than min_tokens were generated."""
        eos = [] if self.ignore_eos or self.eos_token_id is None else [self.eos_token_id]
        return sorted(self.all_stop_token_ids.union(eos))

    @property
    def num_sample_logprobs(self) -> int | None:
        """Top-k to compute per sampled token; best_of > n needs at least the sampled one's."""
        if self.logprobs is None and self.best_of > self.n:
            return 0
        return self.logprobs

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone(self) -> SamplingParams:
        import copy

        return copy.deepcopy(self)
