"""The `pagedllm` command: generate, serve, bench."""

from __future__ import annotations

import argparse
import sys

from pagedllm.config import EngineArgs

# Where `serve` defaults differ from EngineArgs': the server runs its engine core in a process of
# its own, faster at 1, 8 and 32 streaming clients (docs/benchmarks.md, "Engine core in its own
# process"); offline use keeps it in-process.
SERVE_DEFAULTS = {"engine_core_process": True}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--max-tokens", type=int, default=64)
    group.add_argument("--min-tokens", type=int, default=0)
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def sampling_params_from_args(args: argparse.Namespace):
    from pagedllm.sampling_params import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, seed=args.sampling_seed,
        stop=args.stop, ignore_eos=args.ignore_eos,
    )


def run_generate(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.llm import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    params = sampling_params_from_args(args)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params,
                           use_tqdm=False)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for prompt, output in zip(args.prompts, outputs):
        completion = output.outputs[0]
        print(f"=== {prompt!r} ({len(completion.token_ids)} tokens, "
              f"finish: {completion.finish_reason})")
        print(completion.text)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.openai.api_server import run_server

    try:
        return run_server(args)
    except KeyboardInterrupt:  # Ctrl+C while the model was still loading
        return 130


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_serve_args(serve: argparse.ArgumentParser, model_flag: bool = False) -> None:
    """`serve`'s options; `model_flag`: the model as --model (vLLM's api_server spelling)."""
    from pagedllm.entrypoints.openai.cli_args import add_server_args

    if model_flag:
        serve.add_argument("--model", default=None, help="HF folder, .gguf file or hub id "
                                                          "(default: bundled SmolLM2-135M)")
    else:
        serve.add_argument("model", nargs="?", default=None,
                           help="HF folder, .gguf file or hub id (default: bundled "
                                "SmolLM2-135M)")
    add_server_args(serve)
    EngineArgs.add_cli_args(serve, skip=("model",))
    serve.set_defaults(handler=run_serve, **SERVE_DEFAULTS)


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                formatter_class=DefaultsHelpFormatter)
    add_serve_args(serve)


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """`with_bench=False` lists `bench` without building its options, whose modules import
    torch (seconds): `pagedllm --help` and `pagedllm serve ...` do not need them."""
    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete prompts and print the results")
    generate.add_argument("prompts", nargs="+", help="prompt text (one or more)")
    generate.add_argument("--chat", action="store_true",
                          help="wrap each prompt as a user message in the chat template")
    EngineArgs.add_cli_args(generate)
    add_sampling_args(generate)
    generate.set_defaults(handler=run_generate)
    add_serve_parser(commands)
    if with_bench:
        add_bench_parser(commands)
    else:
        commands.add_parser("bench", help="measure throughput and latency")
    return parser


def add_bench_parser(commands) -> None:
    from pagedllm.bench import latency, serve, throughput

    bench = commands.add_parser("bench", help="measure throughput and latency")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    for kind in (throughput, latency, serve):
        kind.add_parser(kinds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(with_bench="bench" in argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top level's
        command = parser._subparsers._group_actions[0].choices[args.command]
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
