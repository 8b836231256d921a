"""vLLM's server surface without a model: CLI spellings and speed, LLM() options, start-up
checks of the chat options, generation_config.json defaults, vLLM metric names, the engine
stats line, and a chat answer's reasoning read from scripted engine outputs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pagedllm.engine.async_llm import EngineStats
from pagedllm.engine.request_tracking import RequestStats
from pagedllm.entrypoints.cli import build_parser
from pagedllm.entrypoints.llm import engine_kwargs
from pagedllm.entrypoints.openai.cli_args import ServerOptions, load_chat_template
from pagedllm.entrypoints.openai.generation_config import load_sampling_defaults
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, UsageInfo
from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pagedllm.entrypoints.openai.server_logging import StatsLogger
from pagedllm.entrypoints.openai.serving_chat import _Job
from pagedllm.entrypoints.openai.tool_calls import ChatOutputSplitter
from pagedllm.outputs import CompletionOutput, RequestOutput


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


# ---- the command line --------------------------------------------------------------------------
def test_help_does_not_import_torch():
    code = ("import sys; from pagedllm.entrypoints.cli import build_parser; "
            "build_parser(with_bench=False).parse_known_args(['serve']); "
            "print(sorted(m for m in ('torch', 'fastapi', 'transformers') if m in sys.modules))")
    assert run("-c", code).stdout.strip() == "[]"


def test_python_m_spellings_and_serve_usage():
    top = run("-m", "pagedllm", "--help")
    assert top.returncode == 0 and "serve" in top.stdout
    bad = run("-m", "pagedllm", "serve", "--no-such-flag")
    assert bad.returncode == 2
    assert "usage: pagedllm serve" in bad.stderr
    assert "unrecognized arguments: --no-such-flag" in bad.stderr
    vllm_style = run("-m", "pagedllm.entrypoints.openai.api_server", "--help")
    assert vllm_style.returncode == 0 and "--model MODEL" in vllm_style.stdout


def test_serve_help_shows_defaults_and_vllm_aliases():
    parser = build_parser(with_bench=False)
    serve = parser._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    assert "(default: 127.0.0.1)" in text and "(default: 8000)" in text
    args = parser.parse_args(["serve", "--kv-cache-memory-bytes", "1GiB",
                              "--disable-uvicorn-access-log", "--enable-log-requests",
                              "--max-log-len", "10", "--allowed-origins", '["https://a"]'])
    assert args.kv_cache_memory_bytes == 1 << 30 and args.disable_access_log
    options = ServerOptions.from_cli_args(args)
    assert options.log_requests and options.max_log_len == 10
    assert options.allowed_origins == ("https://a",)


def test_chat_options_fail_at_start_up():
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        ServerOptions(enable_auto_tool_choice=True, tool_call_parser="nope")
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ServerOptions(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        ServerOptions(reasoning_parser="nope")
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template("no-such-file.jinja")
    assert load_chat_template("{{ messages }}") == "{{ messages }}"


def test_llm_options_vllm_users_try():
    assert engine_kwargs({"trust_remote_code": True, "tensor_parallel_size": 1}) == {
        "tensor_parallel_size": 1}
    with pytest.raises(ValueError, match="'disable_custom_all_reduce'.*not support"):
        engine_kwargs({"disable_custom_all_reduce": True, "kv_cache_dtype": "auto"})


# ---- generation_config.json --------------------------------------------------------------------
def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 5, "do_sample": True}))
    assert load_sampling_defaults("auto", tmp_path) == {"temperature": 0.6, "top_p": 0.95,
                                                        "top_k": 20}
    assert load_sampling_defaults(str(tmp_path), tmp_path / "elsewhere") == \
        load_sampling_defaults("auto", tmp_path)
    assert load_sampling_defaults("vllm", tmp_path) == {}
    assert load_sampling_defaults("auto", tmp_path / "model.gguf") == {}
    with pytest.raises(ValueError, match="no generation_config.json"):
        load_sampling_defaults(str(tmp_path / "missing"), tmp_path)


# ---- metrics and the stats line ----------------------------------------------------------------
class FakeEngine:
    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats
        self.observers = []

    def add_observer(self, observer) -> None:
        self.observers.append(observer)

    def finish(self, stats: RequestStats) -> None:
        for observer in self.observers:
            observer(stats)


FINISHED = RequestStats("r1", "stop", num_prompt_tokens=7, num_generation_tokens=5,
                        arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0,
                        finished_time=13.0)


def test_vllm_metric_names_with_model_name():
    engine = FakeEngine(EngineStats(num_running=2, num_waiting=3))
    metrics = ServerMetrics(engine, "smol")
    engine.finish(FINISHED)
    text = metrics.render().decode()
    for line in ('vllm:num_requests_running{model_name="smol"} 2.0',
                 'vllm:num_requests_waiting{model_name="smol"} 3.0',
                 'vllm:kv_cache_usage_perc{model_name="smol"} 0.0',
                 'vllm:prompt_tokens_total{model_name="smol"} 7.0',
                 'vllm:generation_tokens_total{model_name="smol"} 5.0',
                 'vllm:request_success_total{finished_reason="stop",model_name="smol"} 1.0',
                 'vllm:inter_token_latency_seconds_count{model_name="smol"} 4.0',
                 'vllm:inter_token_latency_seconds_sum{model_name="smol"} 2.0',
                 'vllm:time_to_first_token_seconds_sum{model_name="smol"} 1.0',
                 'vllm:e2e_request_latency_seconds_sum{model_name="smol"} 3.0',
                 'pagedllm:num_requests_waiting 3.0'):
        assert line in text, line


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_stats_line_only_while_there_is_work():
    engine = FakeEngine(EngineStats())
    stats = StatsLogger(engine, interval=2.0)
    lines = Lines()
    logging.getLogger("pagedllm.server").addHandler(lines)
    try:
        assert not stats.log_once()  # idle: silent
        engine.finish(FINISHED)
        engine.stats = EngineStats(num_running=1, num_waiting=4)
        assert stats.log_once()
    finally:
        logging.getLogger("pagedllm.server").removeHandler(lines)
    assert len(lines.lines) == 1
    assert "prompt 3.5 tokens/s, generation 2.5 tokens/s, running 1, waiting 4" in lines.lines[0]


# ---- reasoning, from scripted engine outputs ---------------------------------------------------
def test_reasoning_content_streamed_and_whole():
    pieces = ["<thi", "nk>The user", " wants 4.</th", "ink>\n\nIt is", " 4."]
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "2+2?"}],
                                    stream=True)
    splitter = ChatOutputSplitter(reasoning=get_reasoning_parser("deepseek_r1"))
    streamed, whole = _Job(request, "c1", "m", splitter), _Job(request, "c2", "m", splitter)
    deltas = []
    for i, text in enumerate(pieces):
        last = i == len(pieces) - 1
        output = RequestOutput("c", "p", [1], [CompletionOutput(
            0, text, [i], finish_reason="stop" if last else None)], finished=last)
        deltas += [c.choices[0].delta for c in streamed.chunks(output)]
        whole.merge(output)
    message = whole.whole_response(UsageInfo()).choices[0].message
    assert (message.reasoning_content, message.content) == ("The user wants 4.", "It is 4.")
    assert "".join(d.reasoning_content or "" for d in deltas) == "The user wants 4."
    assert "".join(d.content or "" for d in deltas) == "It is 4."


def test_vllm_api_key_env_is_read(monkeypatch):
    from pagedllm.entrypoints.openai.cli_args import API_KEY_ENV, resolve_api_key

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm-env")
    assert resolve_api_key(None) == "from-vllm-env"
    monkeypatch.setenv(API_KEY_ENV, "ours")
    assert resolve_api_key(None) == "ours"


def test_offline_chat_takes_tools_and_template_kwargs(offline_llm):
    from pathlib import Path

    from pagedllm import SamplingParams

    template = (Path(__file__).parent / "templates" / "tool_chat.jinja").read_text()
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    output = offline_llm.chat([{"role": "user", "content": "Time?"}],
                              SamplingParams(max_tokens=1), use_tqdm=False,
                              chat_template=template, tools=[tool],
                              chat_template_kwargs={"test_marker": "on"})[0]
    assert '{"name": "get_time"' in output.prompt and output.prompt.endswith("[marker: on]")
    with pytest.raises(ValueError, match="may not set tokenize"):
        offline_llm.chat([{"role": "user", "content": "x"}], use_tqdm=False,
                         chat_template_kwargs={"tokenize": True})
