"""OutputProcessor on its own: what reaches the caller after a sequence has ended."""

from __future__ import annotations

from pagedllm import RequestOutputKind, SamplingParams
from pagedllm.core.step_io import EngineCoreOutput
from pagedllm.engine.output_processor import OutputProcessor, sequence_id


def test_tokens_after_a_stop_string_are_dropped(llm):
    """A core in another process may send a sibling's next token before it hears that a stop
    string ended it; nothing of that token reaches the caller."""
    tokenizer = llm.get_tokenizer()
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, stop=["cat"], output_kind=RequestOutputKind.DELTA)
    params.best_of = 2
    processor.add_request("r", "p", [1, 2], params, arrival_time=0.0)
    first, second = sequence_id("r", 0), sequence_id("r", 1)
    said = tokenizer.encode(" a cat", add_special_tokens=False)
    outputs, stopped = processor.process([EngineCoreOutput(first, said, [None] * len(said))])
    assert stopped == [first] and outputs[0].outputs[0].finish_reason == "stop"
    late = tokenizer.encode(" sat", add_special_tokens=False)
    outputs, stopped = processor.process([EngineCoreOutput(first, late, [None] * len(late)),
                                          EngineCoreOutput(second, late, [None] * len(late))])
    assert stopped == []
    assert [c.index for o in outputs for c in o.outputs] == [1]  # only the live sibling
    processor.abort(["r"])
