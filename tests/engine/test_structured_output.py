"""Structured outputs end to end on the default model: JSON schemas, regex, choice, grammars;
with n > 1, streaming, prefix caching and preemption; compiling off the step loop; one batched
mask per step; and how grammars compose with the other logits processors."""

from __future__ import annotations

import ast
import concurrent.futures
import json
import re
import threading
import time

import jsonschema
import pytest
from conftest import make_llm, worker_of
from structured_output.schemas import SCHEMAS

from pagedllm import RequestOutputKind, SamplingParams, StructuredOutputsParams
from pagedllm.structured_output.step import GRAMMAR_WAIT_S

BLOCK_BYTES = 737280  # one 16-token block of the bundled model in float32

# A small arithmetic language with bounded nesting and length, so every sample ends in time.
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= number | "(" inner ")"
inner ::= number (("+" | "-" | "*") number){1,3}
number ::= [1-9] [0-9]{0,2}
"""


def chat_prompt(llm, question: str) -> dict:
    text = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return {"prompt": text}


def constrained(max_tokens: int = 64, temperature: float = 1.0, seed: int | None = None,
                **constraint) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed,
                          structured_outputs=StructuredOutputsParams(**constraint))


def texts(outputs) -> list[str]:
    return [c.text for o in outputs for c in o.outputs]


def test_twenty_json_schemas_all_validate_at_temperature_one(llm):
    prompt = chat_prompt(llm, "Reply with an example JSON object.")
    params = [SamplingParams(temperature=1.0, max_tokens=200, seed=i,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for i, schema in enumerate(SCHEMAS)]
    outputs = llm.generate([prompt] * len(SCHEMAS), params, use_tqdm=False)
    for schema, output in zip(SCHEMAS, outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)


def test_regex_and_choice_outputs_always_match(llm):
    patterns = [r"\(\d{3}\) \d{3}-\d{4}", r"[a-z]{3,8}@[a-z]{2,6}\.(com|org)",
                r"(yes|no), because [a-z ]{5,20}\."]
    prompt = chat_prompt(llm, "Answer briefly.")
    for pattern in patterns:
        outputs = llm.generate(prompt, SamplingParams(
            n=4, temperature=1.0, max_tokens=48,
            structured_outputs=StructuredOutputsParams(regex=pattern)), use_tqdm=False)
        for text in texts(outputs):
            assert re.fullmatch(pattern, text), (pattern, text)
    choices = ["Paris", "Lyon", 'the "city" of lights', "Saint-Étienne", "two\nlines"]
    outputs = llm.generate([prompt] * 3, SamplingParams(
        n=4, temperature=1.5, max_tokens=16,
        structured_outputs=StructuredOutputsParams(choice=choices)), use_tqdm=False)
    assert all(text in choices for text in texts(outputs)), texts(outputs)
    assert all(c.finish_reason == "stop" for o in outputs for c in o.outputs)


def test_arithmetic_grammar_output_parses(llm):
    prompt = chat_prompt(llm, "Write an arithmetic expression.")
    outputs = llm.generate([prompt] * 4, [constrained(96, grammar=ARITHMETIC, seed=None)
                                          for _ in range(4)], use_tqdm=False)
    for text in texts(outputs):
        tree = ast.parse(text, mode="eval")  # the language is a subset of Python's
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), text


def test_json_object_gives_an_object(llm):
    (out,) = llm.generate(chat_prompt(llm, "Describe a cat in JSON."),
                          constrained(120, temperature=0.7, json_object=True, seed=1),
                          use_tqdm=False)
    if out.outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(out.outputs[0].text), dict)
    else:  # an unbounded object may run out of tokens; it is still a valid prefix
        assert out.outputs[0].text.startswith("{")


def test_siblings_and_best_of_are_each_constrained(llm):
    params = SamplingParams(n=3, best_of=5, temperature=1.2, max_tokens=24, seed=5,
                            structured_outputs=StructuredOutputsParams(regex=r"[0-9]{2}-[A-Z]{3}"))
    (out,) = llm.generate(chat_prompt(llm, "A code please."), params, use_tqdm=False)
    assert len(out.outputs) == 3
    assert all(re.fullmatch(r"[0-9]{2}-[A-Z]{3}", c.text) for c in out.outputs)


def test_streamed_deltas_add_up_to_a_valid_document(llm):
    engine = llm.llm_engine
    schema = SCHEMAS[6]
    params = constrained(200, seed=3, json=schema)
    params.output_kind = RequestOutputKind.DELTA
    engine.add_request("stream-json", chat_prompt(llm, "A user as JSON."), params)
    deltas, finish = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            deltas.append(output.outputs[0].text)
            finish = output.outputs[0].finish_reason
    assert finish == "stop" and len(deltas) > 5
    jsonschema.validate(json.loads("".join(deltas)), schema)


def test_prefix_cached_prompt_is_constrained_the_same(llm):
    long_question = "Here is some context. " * 20 + "Now give a color as JSON."
    prompt = chat_prompt(llm, long_question)
    params = constrained(40, temperature=0, json=SCHEMAS[2])
    (first,) = llm.generate(prompt, params, use_tqdm=False)
    (second,) = llm.generate(prompt, params, use_tqdm=False)
    assert second.num_cached_tokens >= 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    jsonschema.validate(json.loads(second.outputs[0].text), SCHEMAS[2])


@pytest.mark.parametrize("engine_args", [
    {"kv_cache_memory_bytes": 20 * BLOCK_BYTES},  # recompute (shared with test_correctness)
    {"kv_cache_memory_bytes": 8 * BLOCK_BYTES, "preemption_mode": "swap", "swap_space": 0.05},
], ids=["recompute", "swap"])
def test_preempted_requests_keep_their_grammar_state(llm, engine_args):
    small = make_llm(**engine_args)
    schema = SCHEMAS[12]  # a 3x3 matrix: long enough to run past a block or two
    prompts = [f"Task {i}. We are testing a program that reads matrices, so please fill in a "
               f"small integer matrix as JSON." for i in range(8)]
    params = constrained(60, temperature=0, json=schema)
    preemptions = small.llm_engine.engine_core.scheduler.num_preemptions
    outputs = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.engine_core.scheduler.num_preemptions > preemptions
    for output in outputs:
        completion = output.outputs[0]
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), schema)
        else:
            assert completion.finish_reason == "length" and completion.text.startswith("{")
    # The roomy engine gives the same tokens: preemption lost no grammar state.
    expected = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


class GatedPool:
    """Stands in for the compile pool: every compile waits until the gate opens."""

    def __init__(self, pool, gate: threading.Event) -> None:
        self.pool, self.gate = pool, gate

    def submit(self, fn, *args):
        return self.pool.submit(lambda: self.gate.wait(60) and fn(*args))


def test_a_compiling_grammar_does_not_hold_up_the_batch(llm, monkeypatch):
    engine = llm.llm_engine
    manager = engine.engine_core.structured_output
    gate = threading.Event()
    monkeypatch.setattr(manager, "_executor", GatedPool(manager._pool(), gate))
    schema = {"type": "object", "properties": {"gated": {"type": "integer", "minimum": 0,
                                                         "maximum": 9}}, "required": ["gated"]}
    engine.add_request("constrained", "A digit as JSON:", constrained(20, json=schema))
    engine.add_request("plain", "Hello, my name is",
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    finished = {}
    while "plain" not in finished:
        for output in engine.step():
            finished[output.request_id] = output
    assert "constrained" not in finished
    assert engine.engine_core.scheduler.requests["constrained"].waiting_for_grammar
    assert all("constrained" not in r.scheduled for r in engine.step_records if r.scheduled)
    gate.set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            finished[output.request_id] = output
    assert json.loads(finished["constrained"].outputs[0].text)["gated"] in range(10)


class FailingPool:
    """Stands in for the compile pool: every compile fails (parsing passed, so this is the
    unexpected case), at once or when the gate opens."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate

    def submit(self, fn, *args):
        future = concurrent.futures.Future()

        def fail() -> None:
            if self.gate is not None:
                self.gate.wait(60)
            future.set_exception(RuntimeError("compiler exploded"))

        if self.gate is None:
            fail()
        else:
            threading.Thread(target=fail, daemon=True).start()
        return future


def test_a_failed_compile_ends_only_its_own_request(llm, monkeypatch):
    engine = llm.llm_engine
    gate = threading.Event()
    monkeypatch.setattr(engine.engine_core.structured_output, "_executor", FailingPool(gate))
    doomed = SamplingParams(n=2, temperature=1.0, max_tokens=4,
                            structured_outputs=StructuredOutputsParams(regex=r"doomed [0-9]"))
    engine.add_request("doomed", "x", doomed)
    engine.add_request("fine", "x", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()
    gate.set()  # fails while the request waits: its sequences end with "abort"
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert [c.finish_reason for c in finished["doomed"].outputs] == ["abort", "abort"]
    assert len(finished["fine"].outputs[0].token_ids) == 3
    # failed already when the request is added: a ValueError then and there
    monkeypatch.setattr(engine.engine_core.structured_output, "_executor", FailingPool())
    with pytest.raises(ValueError, match="compiling the grammar .* failed: compiler exploded"):
        llm.generate("x", constrained(2, regex=r"late [0-9]"), use_tqdm=False)


def test_a_step_with_only_compiling_requests_sleeps_instead_of_spinning(llm, monkeypatch):
    engine = llm.llm_engine
    manager = engine.engine_core.structured_output
    gate = threading.Event()
    monkeypatch.setattr(manager, "_executor", GatedPool(manager._pool(), gate))
    engine.add_request("alone", "Two digits:", constrained(8, regex=r"[0-9]{2}[.]"))
    started = time.perf_counter()
    assert all(engine.step() == [] for _ in range(5))
    assert time.perf_counter() - started >= 4 * GRAMMAR_WAIT_S
    gate.set()
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert re.fullmatch(r"[0-9]{2}[.]", outputs[-1].outputs[0].text)


def test_one_batched_fill_and_apply_per_step_and_none_without_constraints(llm, monkeypatch):
    import pagedllm.structured_output.bitmask as manager_module  # where apply_bitmask is called

    worker_of(llm)  # the masks are applied in the worker: counted only where it is this process
    engine = llm.llm_engine
    calls: list[list[int]] = []
    real_apply = manager_module.apply_bitmask

    def counting_apply(logits, bitmask, rows, vocab_size):
        calls.append(list(rows))
        real_apply(logits, bitmask, rows, vocab_size)

    monkeypatch.setattr(manager_module, "apply_bitmask", counting_apply)
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(["Hello, my name is", "The capital of France is"], plain, use_tqdm=False)
    assert calls == []  # unconstrained requests never reach the grammar code
    first_step = engine.num_steps
    params = [constrained(16, regex=r"[a-z]{12}", seed=i) for i in range(6)] + [plain, plain]
    outputs = llm.generate([f"Word {i}:" for i in range(8)], params, use_tqdm=False)
    assert all(re.fullmatch(r"[a-z]{12}", o.outputs[0].text) for o in outputs[:6])
    ids = [o.request_id for o in outputs[:6]]
    records = [r for r in engine.step_records if r.step > first_step]
    per_step = [sum(i in r.scheduled for i in ids) for r in records]
    # one apply per step that samples constrained rows, covering all of them at once
    assert [len(rows) for rows in calls] == [n for n in per_step if n]
    assert max(per_step) == 6


def test_eos_is_allowed_only_where_the_grammar_may_end(llm):
    eos = llm.llm_engine.model_config.eos_token_ids[0]
    params = SamplingParams(temperature=0, max_tokens=40, logit_bias={eos: 100.0},
                            structured_outputs=StructuredOutputsParams(regex=r"[a-z]{10}"))
    (out,) = llm.generate("Letters:", params, use_tqdm=False)
    # EOS is the model's favourite by far, yet it comes only once ten letters are written
    assert re.fullmatch(r"[a-z]{10}", out.outputs[0].text)
    assert out.outputs[0].token_ids[-1] == eos and out.outputs[0].finish_reason == "stop"


def test_a_finished_grammar_stops_the_request_even_with_ignore_eos(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    (out,) = llm.generate(chat_prompt(llm, "Is water wet?"), params, use_tqdm=False)
    assert out.outputs[0].text in ("yes", "no")
    assert out.outputs[0].finish_reason == "stop"


def test_logit_bias_allowed_tokens_and_penalties_compose_with_the_grammar(llm):
    tokenizer = llm.get_tokenizer()
    prompt = chat_prompt(llm, "Pick one.")
    first = {"beta": tokenizer.encode("beta", add_special_tokens=False)[0]}
    choice = StructuredOutputsParams(choice=["alpha", "beta"])
    (out,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8,
                                                 logit_bias={first["beta"]: 100.0},
                                                 structured_outputs=choice), use_tqdm=False)
    assert out.outputs[0].text == "beta"
    beta_ids = tokenizer.encode("beta", add_special_tokens=False)
    allowed = beta_ids + llm.llm_engine.model_config.eos_token_ids
    (out,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8,
                                                 allowed_token_ids=allowed,
                                                 structured_outputs=choice), use_tqdm=False)
    assert out.outputs[0].text == "beta"
    penalized = SamplingParams(temperature=1.0, max_tokens=40, seed=2, repetition_penalty=1.5,
                               frequency_penalty=1.0, presence_penalty=1.0,
                               structured_outputs=StructuredOutputsParams(regex=r"(ab){5}"))
    (out,) = llm.generate(prompt, penalized, use_tqdm=False)
    assert out.outputs[0].text == "ababababab"  # the grammar wins over the penalties


def test_no_legal_token_left_ends_the_request_cleanly(llm):
    # allowed_token_ids and the grammar have nothing in common: the request stops at once,
    # with no text, and the engine goes on serving.
    digits = StructuredOutputsParams(regex=r"[0-9]+")
    letter = llm.get_tokenizer().encode("x", add_special_tokens=False)
    (out,) = llm.generate("Count:", SamplingParams(temperature=0, max_tokens=5,
                                                   allowed_token_ids=letter,
                                                   structured_outputs=digits), use_tqdm=False)
    assert out.outputs[0].text == "" and out.outputs[0].finish_reason == "stop"
    (ok,) = llm.generate("Count:", constrained(5, temperature=0, regex=r"[0-9]{3}"),
                         use_tqdm=False)
    assert re.fullmatch(r"[0-9]{3}", ok.outputs[0].text)


@pytest.mark.parametrize("constraint, message", [
    ({"json": {"type": "object", "properties": {"a": {"type": "nope"}}}},
     'invalid JSON schema .*Unsupported type "nope"'),
    ({"regex": "[a-z"}, "invalid regex"),
    ({"grammar": "root ::= missing"}, 'invalid grammar .*"missing" is not defined'),
])
def test_bad_constraints_raise_value_error_and_the_engine_keeps_serving(llm, constraint, message):
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**constraint))
    with pytest.raises(ValueError, match=message):
        llm.generate(["fine", "also fine"], [SamplingParams(max_tokens=2), bad], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    (ok,) = llm.generate("x", constrained(4, temperature=0, choice=["ok"]), use_tqdm=False)
    assert ok.outputs[0].text == "ok"


def test_equal_constraints_compile_once(llm):
    manager = llm.llm_engine.engine_core.structured_output
    schema = {"type": "object", "properties": {"once": {"type": "boolean"}},
              "required": ["once"]}
    compiles = manager.num_compiles
    params = [constrained(12, temperature=0, json=dict(schema)) for _ in range(3)]
    outputs = llm.generate(["a", "b", "c"], params, use_tqdm=False)
    llm.generate("d", constrained(12, temperature=0, json=schema), use_tqdm=False)
    assert manager.num_compiles == compiles + 1
    assert all(isinstance(json.loads(o.outputs[0].text)["once"], bool) for o in outputs)


def test_engine_without_tokenizer_refuses_constraints(llm):
    bare = make_llm(skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=2, detokenize=False,
                            structured_outputs=StructuredOutputsParams(regex="a"))
    with pytest.raises(ValueError, match="structured_outputs needs a tokenizer"):
        bare.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)


def marker_in(tokenizer, token_ids: list[int]) -> tuple[int, str]:
    """(end, text): the first two-token run of the output whose text the tokenizer splits back
    into those two tokens, so it is a marker the model writes on its own; end is where it ends."""
    for start in range(1, len(token_ids) - 1):
        text = tokenizer.decode(token_ids[start:start + 2])
        if tokenizer.encode(text, add_special_tokens=False) == list(token_ids[start:start + 2]):
            return start + 2, text
    raise AssertionError(f"no round-tripping marker in {token_ids}")


def test_start_after_leaves_the_output_free_until_its_marker(llm):
    """The reasoning-model case (start_after="</think>"): free text up to the marker, then the
    grammar. Decoding one token a step, the marker's two tokens arrive in different steps."""
    prompt = chat_prompt(llm, "Describe the sea in one sentence.")
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12),
                        use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    end, marker = marker_in(tokenizer, list(free.token_ids))
    params = constrained(max_tokens=end + 8, temperature=0, choice=["yes", "no"],
                         start_after=marker)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids[:end]) == list(free.token_ids[:end])  # unconstrained until then
    head = tokenizer.decode(free.token_ids[:end])
    assert out.text.startswith(head) and out.text[len(head):] in ("yes", "no"), out.text
    assert out.finish_reason == "stop"
    from_start = llm.generate([prompt], constrained(temperature=0, choice=["yes", "no"]),
                              use_tqdm=False)[0].outputs[0]
    assert from_start.text in ("yes", "no")  # without start_after: constrained from token one


def test_start_after_must_be_text():
    with pytest.raises(ValueError, match="start_after"):
        StructuredOutputsParams(choice=["a"], start_after="")
