"""What one request may ask for: caps on every list and count whose cost grows with what a client
sends, each a `pagedllm serve` option (`--max-stop 64`, ...).

Without them one request can make every step slow for everyone (50,000 bad words are checked
against every new token; a 100,000-character stop string is searched for after every token) or
fan out into more sequences than the server runs at once. A request over a cap gets a 400 that
names the field and the cap. The server's OpenAPI document states the caps in force
and the served model's bounds (`document_limits`), so a client can read them.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module; pydantic's models need not load for --help
    from pagedllm.entrypoints.openai.protocol import SamplingRequest

LIMIT_KEY = "x-pagedllm-limits"  # in a schema: {keyword: a name in RequestLimits or ModelBounds}

DEFAULT_MAX_TOKENS = 2048  # when neither the request, the option nor the model says


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 64  # completions per prompt (n, best_of, a beam search's width)
    max_prompts: int = 256  # prompts in one /v1/completions request
    max_stop: int = 64  # stop strings
    max_stop_chars: int = 1000  # characters of one stop string
    max_stop_token_ids: int = 1024
    max_bad_words: int = 256
    max_logit_bias: int = 1024  # entries of logit_bias
    max_allowed_token_ids: int = 16384
    max_tokens_default: int | None = None  # when a request sets none (None: the model's own)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 1:
                raise ValueError(f"{f.name} must be at least 1, got {value}")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> RequestLimits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)
                      if getattr(args, f.name, None) is not None})

    def problems(self, request: SamplingRequest) -> list[tuple[str, str]]:
        """(param, reason) for every cap the request goes over."""
        return [(param, f"{param} has {count} {what}; this server allows at most {cap} "
                        f"(its --{option.replace('_', '-')} option)")
                for param, count, what, option, cap in self._counts(request) if count > cap]

    def _counts(self, request: SamplingRequest) -> Iterator[tuple[str, int, str, str, int]]:
        """(param, how many the request asks for, of what, the option, its cap)."""
        yield "n", request.n, "completions", "max_n", self.max_n
        if request.best_of is not None:
            yield "best_of", request.best_of, "completions", "max_n", self.max_n
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        yield "stop", len(stops), "strings", "max_stop", self.max_stop
        longest = max((len(s) for s in stops), default=0)
        yield "stop", longest, "characters in one string", "max_stop_chars", self.max_stop_chars
        for param, value, option in (
                ("stop_token_ids", request.stop_token_ids, "max_stop_token_ids"),
                ("bad_words", request.bad_words, "max_bad_words"),
                ("logit_bias", request.logit_bias, "max_logit_bias"),
                ("allowed_token_ids", request.allowed_token_ids, "max_allowed_token_ids")):
            yield param, len(value or ()), "entries", option, getattr(self, option)
        prompt = getattr(request, "prompt", None)  # /v1/completions only
        if prompt is not None:
            yield "prompt", num_prompts(prompt), "prompts", "max_prompts", self.max_prompts

    def default_max_tokens(self, model_default: int | None) -> int:
        """max_tokens for a request that sets none: this server's option, else the model's
        generation config, else DEFAULT_MAX_TOKENS (the engine still caps it by the room the
        prompt leaves in the context)."""
        return self.max_tokens_default or model_default or DEFAULT_MAX_TOKENS


def num_prompts(prompt: str | list) -> int:
    """A string or a list of token ids is one prompt; a list of either, one per entry."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


LIMIT_HELP = {
    "max_n": "most completions one request may ask for (n, best_of, beam width)",
    "max_prompts": "most prompts in one /v1/completions request",
    "max_stop": "most stop strings per request",
    "max_stop_chars": "longest stop string, in characters",
    "max_stop_token_ids": "most stop_token_ids per request",
    "max_bad_words": "most bad_words per request",
    "max_logit_bias": "most logit_bias entries per request",
    "max_allowed_token_ids": "most allowed_token_ids per request",
    "max_tokens_default": "max_tokens for a request that sets none (default: the model's "
                          f"generation config, else {DEFAULT_MAX_TOKENS}); never more than the "
                          "context allows",
}


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("request limits (a request over one gets a 400)")
    defaults = RequestLimits()
    for f in fields(RequestLimits):
        default = getattr(defaults, f.name)
        shown = "" if default is None else f" (default {default})"
        group.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                           help=LIMIT_HELP[f.name] + shown)


@dataclass(frozen=True)
class ModelBounds:
    """What the served model bounds in a request, for the OpenAPI document."""

    served_names: list[str]
    vocab_size: int
    max_model_len: int
    max_prompt_chars: int | None = None  # longer text cannot fit max_model_len tokens
    cache_tokens: int | None = None  # the whole KV cache, in tokens

    def values(self) -> dict[str, Any]:
        room = min(self.max_model_len, self.cache_tokens or self.max_model_len)
        return {
            "served_models": [*self.served_names, ""],  # "" (like null) names the first
            "vocab_size": self.vocab_size,
            "token_id_names": {"pattern": f"^0*(?:{decimal_below(self.vocab_size)})$"},
            "max_model_len": self.max_model_len,
            "max_prompt_tokens": room - 1,  # a prompt leaves room for one token
            "max_new_tokens": room - 1,  # after a prompt of at least one token
            "max_prompt_chars": self.max_prompt_chars,
        }


def document_limits(schema: dict[str, Any], limits: RequestLimits,
                    model: ModelBounds | None = None) -> None:
    """Write into an OpenAPI document's request schemas, in place, the values they name by
    `{LIMIT_KEY: {keyword: name}}` (protocol.Limit): this server's caps and its model's bounds.
    A keyword whose value is not known here is left out."""
    values = {f.name: getattr(limits, f.name) for f in fields(limits)}
    values.update(model.values() if model else {})
    stack: list[Any] = [schema.get("components", {}).get("schemas", {})]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for keyword, name in node.pop(LIMIT_KEY, {}).items():
            if values.get(name) is not None:
                node[keyword] = values[name]
        stack.extend(node.values())


def decimal_below(n: int) -> str:
    """A regex matching the decimals 0 to n - 1 (n >= 1), written without leading zeros."""
    top = str(n - 1)
    shorter = ["0"] if len(top) > 1 else []
    if len(top) > 2:
        shorter.append(f"[1-9][0-9]{{0,{len(top) - 2}}}")
    elif len(top) == 2:
        shorter.append("[1-9]")
    same_length = []  # as many digits as n - 1: below it at one digit, equal before it
    for i, digit in enumerate(top):
        lowest = 1 if i == 0 and len(top) > 1 else 0
        if int(digit) > lowest:
            below = str(lowest) if int(digit) - 1 == lowest else f"[{lowest}-{int(digit) - 1}]"
            rest = len(top) - i - 1
            tail = "" if rest == 0 else "[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"
            same_length.append(top[:i] + below + tail)
    same_length.append(top)
    return "|".join(shorter + same_length)
