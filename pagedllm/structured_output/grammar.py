"""A request's constraint -> its cache key -> an xgrammar Grammar (parsed, not yet compiled).

Parsing is cheap (about a millisecond) and finds every error in a schema, regex or grammar, so
it runs when the request is added and a bad one is refused there with a ValueError. Compiling
against the vocabulary is what takes time (tenths of a second); the manager does that off the
step loop.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from pagedllm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

# json_object: any JSON object, which is exactly what this schema allows.
ANY_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True, slots=True)
class GrammarKey:
    """Everything a compiled grammar depends on (the tokenizer is the engine's): two requests
    with equal keys share one compiled grammar."""

    kind: str  # "json", "regex", "choice", "grammar" (json_object becomes "json")
    text: str  # the schema as JSON text, the regex, the choices as a JSON list, the EBNF
    any_whitespace: bool = False  # JSON only


def grammar_key(params: StructuredOutputsParams) -> GrammarKey:
    kind = params.kind
    if kind == "json_object":
        return GrammarKey("json", ANY_OBJECT_SCHEMA, params.any_whitespace)
    if kind == "json":
        # Keys are not sorted: the order of `properties` is the order the output follows.
        return GrammarKey("json", json.dumps(params.json), params.any_whitespace)
    if kind == "choice":
        return GrammarKey("choice", json.dumps(params.choice))
    return GrammarKey(kind, getattr(params, kind))


def load_xgrammar() -> ModuleType:
    """xgrammar, imported on first use (about a second): engines that never see a constrained
    request never load it. Missing, it is the request's error, not the engine's."""
    try:
        return importlib.import_module("xgrammar")
    except ImportError as exc:
        raise ValueError("structured outputs need the xgrammar package, which is not "
                         "installed (pip install xgrammar)") from exc


def parse_grammar(key: GrammarKey) -> xgrammar.Grammar:
    """The grammar for `key`; a ValueError naming what is wrong if it cannot be one."""
    xgrammar = load_xgrammar()
    what = {"json": "JSON schema", "regex": "regex", "choice": "choice",
            "grammar": "grammar"}[key.kind]
    try:
        if key.kind == "json":
            return xgrammar.Grammar.from_json_schema(key.text, any_whitespace=key.any_whitespace)
        if key.kind == "regex":
            return xgrammar.Grammar.from_regex(key.text)
        if key.kind == "choice":
            return xgrammar.Grammar.from_ebnf(choice_ebnf(json.loads(key.text)))
        return xgrammar.Grammar.from_ebnf(key.text)
    except RuntimeError as exc:
        raise ValueError(f"invalid {what} for structured outputs: {clean_error(exc)}") from exc


def choice_ebnf(choices: list[str]) -> str:
    """`root ::= "a" | "b"`: JSON's string escapes are also EBNF's, so json.dumps quotes each
    choice safely (quotes, backslashes, newlines, non-ASCII)."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


# xgrammar's C++ errors start with "[12:00:00] /project/cpp/file.cc:123: " and sometimes a
# failed check's expression; the user needs only the sentence after them.
_LOCATION = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")
_CHECK = re.compile(r"^Check failed: .*? is false:\s*")


def clean_error(exc: BaseException) -> str:
    message = str(exc).strip()
    message = _LOCATION.sub("", message)
    return _CHECK.sub("", message).strip() or type(exc).__name__
