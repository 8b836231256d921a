"""`pagedllm generate` on the bundled default model (no --model)."""

from __future__ import annotations

from pagedllm.entrypoints.cli import main


def test_generate_prints_greedy_completions(capsys, llm):
    from pagedllm import SamplingParams

    code = main(["generate", "--dtype", "float32", "--kv-cache-memory", "64MiB",
                 "--max-tokens", "8", "The capital of France is", "Hello, my name is"])
    assert code == 0
    printed = capsys.readouterr().out
    expected = llm.generate(["The capital of France is", "Hello, my name is"],
                            SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    for output in expected:
        assert f"=== {output.prompt!r} ({len(output.outputs[0].token_ids)} tokens" in printed
        assert output.outputs[0].text in printed


def test_generate_reports_bad_input_without_a_traceback(capsys):
    assert main(["generate", "--model", "/no/such/model", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
