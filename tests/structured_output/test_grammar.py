"""Constraints -> cache keys -> parsed grammars, and the errors a bad one gives (no model)."""

from __future__ import annotations

import json

import pytest

from pagedllm import SamplingParams, StructuredOutputsParams
from pagedllm.structured_output.grammar import (
    GrammarKey,
    choice_ebnf,
    clean_error,
    grammar_key,
    parse_grammar,
)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of json, regex, choice, grammar or json_object; got none"),
    ({"regex": "a+", "choice": ["a"]}, r"exactly one .* got \['regex', 'choice'\]"),
    ({"choice": []}, "non-empty list of strings"),
    ({"choice": ["a", 3]}, "non-empty list of strings"),
    ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    ({"json": "[1, 2]"}, "must be a JSON schema"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"grammar": 5}, "grammar must be a non-empty string"),
])
def test_params_need_exactly_one_well_formed_constraint(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_params_accept_schema_text_pydantic_models_and_dicts():
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int

    assert StructuredOutputsParams(json='{"type": "object"}').json == {"type": "object"}
    assert StructuredOutputsParams(json=Point).json["required"] == ["x", "y"]
    params = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert params.structured_outputs.kind == "regex"
    assert params.clone().structured_outputs == params.structured_outputs


def test_keys_are_equal_for_equal_constraints_and_keep_property_order():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {}}}
    key = grammar_key(StructuredOutputsParams(json=schema))
    assert key == grammar_key(StructuredOutputsParams(json=dict(schema)))
    assert key.text.index('"b"') < key.text.index('"a"')  # the output follows this order
    assert key != grammar_key(StructuredOutputsParams(json=schema, any_whitespace=True))
    assert grammar_key(StructuredOutputsParams(json_object=True)).kind == "json"
    assert grammar_key(StructuredOutputsParams(choice=["x"])) == GrammarKey("choice", '["x"]')


def test_choice_ebnf_quotes_every_character_safely():
    choices = ['say "hi"', "back\\slash", "two\nlines", "café", ""]
    ebnf = choice_ebnf(choices)
    assert ebnf.startswith("root ::= ")
    assert all(json.dumps(choice) in ebnf for choice in choices)
    parse_grammar(GrammarKey("choice", json.dumps(choices)))  # no error


@pytest.mark.parametrize("key, message", [
    (GrammarKey("json", '{"type": "foo"}'), 'invalid JSON schema .*Unsupported type "foo"'),
    (GrammarKey("json", '{"type": "integer", "minimum": 5, "maximum": 2}'),
     "invalid JSON schema .*minimum greater than maximum"),
    (GrammarKey("regex", "a(b"), "invalid regex .*parenthesis is not closed"),
    (GrammarKey("grammar", 'root ::= "a" | '), "invalid grammar .*EBNF parser error"),
    (GrammarKey("grammar", "root ::= undefined_rule"),
     'invalid grammar .*Rule "undefined_rule" is not defined'),
])
def test_bad_constraints_are_value_errors_with_the_reason(key, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_grammar(key)
    assert "/project/" not in str(caught.value) and "Check failed" not in str(caught.value)


def test_clean_error_keeps_only_the_sentence():
    raw = RuntimeError("[09:08:53] /project/cpp/x.cc:4939: Check failed: (error.empty()) is "
                       "false: Failed to parse JSON: syntax error")
    assert clean_error(raw) == "Failed to parse JSON: syntax error"
    assert clean_error(RuntimeError("plain")) == "plain"
