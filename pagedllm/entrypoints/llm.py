"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.config import EngineArgs
from pagedllm.engine.beam_ranking import (
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
    beam_score,
)
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.pooling import (
    ScoreInput,
    cosine,
    cross_encoder_input,
    is_cross_encoder,
    score_pairs,
)
from pagedllm.inputs import PromptType
from pagedllm.logger import init_logger
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import PoolingOutput, PoolingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.tokenizer import reserved_template_kwargs

logger = init_logger(__name__)
ChatMessage = dict[str, Any]
LoRARequests = LoRARequest | Sequence[LoRARequest | None] | None  # one for all, or one per prompt


def engine_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """LLM()'s keyword arguments as EngineArgs: trust_remote_code is accepted (no checkpoint code
    ever runs here, so there is nothing to trust); any other option EngineArgs lacks, such as
    one of vLLM's, is a ValueError naming it rather than a TypeError from deep inside."""
    kwargs = dict(kwargs)
    if kwargs.pop("trust_remote_code", False):
        logger.info("trust_remote_code=True: pagedllm never runs code from a checkpoint; "
                    "models load from their weights and config alone")
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"LLM() got {', '.join(map(repr, unknown))}, which pagedllm does not "
                         f"support; its options are: {', '.join(sorted(known))}")
    return kwargs
def _prompt_size(prompt: PromptType) -> int:
    """A prompt's length for ordering: its token count, or for text its characters."""
    if isinstance(prompt, dict):
        ids = prompt.get("prompt_token_ids")
        return len(ids) if ids is not None else len(prompt.get("prompt", ""))
    return len(prompt) if isinstance(prompt, str) else 0


class LLM:
    """An engine for offline batches. Keyword arguments are EngineArgs (dtype, max_model_len,
    kv_cache_memory_bytes, max_num_seqs, max_num_batched_tokens, block_size, seed, ...)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineArgs(model=model, **engine_kwargs(kwargs)))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequests = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts.
        `priority`, one per prompt, matters under scheduling_policy="priority" (lower first).
        `lora_request`: the adapter every prompt runs under, or one per prompt (None: the base
        model); needs enable_lora=True."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        loras = self._loras_per_prompt(lora_request, len(prompts))
        request_ids = self._add_requests(prompts, params, priority, loras)
        return self._run(request_ids, use_tqdm)

    @staticmethod
    def _loras_per_prompt(lora_request: LoRARequests, count: int) -> list[LoRARequest | None]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * count
        if isinstance(lora_request, (str, bytes)) or not isinstance(lora_request, Sequence):
            raise ValueError(f"lora_request must be a LoRARequest, a list of them (one per "
                             f"prompt) or None, got {type(lora_request).__name__}")
        if len(lora_request) != count:
            raise ValueError(f"got {len(lora_request)} LoRA requests for {count} prompts")
        return list(lora_request)

    def chat(self, messages: list[ChatMessage] | list[list[ChatMessage]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             lora_request: LoRARequests = None, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate (under
        `lora_request`, as in generate). `tools` (OpenAI tool definitions) and
        `chat_template_kwargs` (e.g. enable_thinking) reach the template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        reserved = reserved_template_kwargs(chat_template_kwargs)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)} (they "
                             "are arguments of chat() itself)")
        template = {"chat_template": chat_template, "tools": tools,
                    **(chat_template_kwargs or {})}
        prompts = [self._chat_prompt(c, template, add_generation_prompt,
                                     continue_final_message) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    def _chat_prompt(self, conversation: list[ChatMessage], template: dict[str, Any],
                     add_generation_prompt: bool, continue_final_message: bool) -> PromptType:
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (the engine has skip_tokenizer_init=True)")
        text = tokenizer.apply_chat_template(
            conversation, **template, tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message)
        # The template already wrote any BOS it wants, so encode without special tokens.
        ids = tokenizer.encode(text, add_special_tokens=False)
        return {"prompt": text, "prompt_token_ids": ids}

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams,
                    lora_request: LoRARequests = None) -> list[BeamSearchOutput]:
        """Beam search per prompt, inside the engine (engine/beam_search.py): beams fork from each
        other and share blocks copy-on-write. Sequences come back best first. Every beam runs
        under its prompt's `lora_request` (as in generate)."""
        engine = self.llm_engine
        request_ids: list[str] = []
        loras = self._loras_per_prompt(lora_request, len(prompts))
        try:
            for prompt, lora in zip(prompts, loras):
                request_id = str(next(self._counter))
                engine.add_beam_search(request_id, prompt, params, lora_request=lora)
                request_ids.append(request_id)
        except Exception:
            engine.abort_request(request_ids)
            raise
        return [self._beam_output(output, params) for output in self._run(request_ids, False)]

    @staticmethod
    def _beam_output(output: RequestOutput, params: BeamSearchParams) -> BeamSearchOutput:
        return BeamSearchOutput([
            BeamSearchSequence(output.prompt_token_ids + c.token_ids, c.cumulative_logprob,
                               c.text, c.finish_reason,
                               beam_score(c.cumulative_logprob, len(c.token_ids),
                                          params.length_penalty))
            for c in output.outputs])

    @staticmethod
    def _params_per_prompt(params, count: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
        return params

    def _add_requests(self, prompts: list[PromptType], params: list[SamplingParams],
                      priority: Sequence[int] | None = None,
                      loras: list[LoRARequest | None] | None = None) -> list[str]:
        engine = self.llm_engine
        added: list[str] = []
        priorities = priority if priority is not None else [0] * len(prompts)
        loras = loras or [None] * len(prompts)
        try:
            for prompt, p, rank, lora in zip(prompts, params, priorities, loras):
                p = p.clone()
                p.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, p, priority=rank, lora_request=lora)
                added.append(request_id)
        except Exception:
            engine.abort_request(added)  # a bad prompt must not leave the good ones queued
            raise
        return added

    # ---- pooling models (runner="pooling"; docs/pooling.md) ---------------------------------
    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | None = None,
              use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """One embedding per prompt: outputs[i].outputs.embedding."""
        return self.encode(prompts, pooling_params, use_tqdm, pooling_task="embed")

    def classify(self, prompts: PromptType | Sequence[PromptType],
                 use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """Class probabilities per prompt (a *ForSequenceClassification model):
        outputs[i].outputs.probs."""
        return self.encode(prompts, None, use_tqdm, pooling_task="classify")

    def encode(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | None = None, use_tqdm: bool = False,
               pooling_task: str = "encode") -> list[PoolingRequestOutput]:
        """Pooling requests, one per prompt, batched by the engine like any others, for
        `pooling_task` (default "encode": the pooled hidden states as they are; embed, classify
        and score are the methods of those names)."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = dataclasses.replace(pooling_params or PoolingParams(), task=pooling_task)
        return self._run_pooling([(p, params) for p in prompts], use_tqdm)

    def score(self, data_1: ScoreInput, data_2: ScoreInput,
              use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """One score per pair (one text against each of several, or two lists by position):
        outputs[i].outputs.score, a cross-encoder's relevance or the cosine similarity of two
        embeddings."""
        pairs = score_pairs(data_1, data_2)
        tasks = self.llm_engine.model_config.pooling_tasks
        if "score" not in tasks:
            supported = ", ".join(tasks) or "none: it generates text"
            raise ValueError(f"this model cannot score (its tasks: {supported})")
        if is_cross_encoder(tasks):
            inputs = [cross_encoder_input(self.get_tokenizer(), q, d) for q, d in pairs]
            return self._run_pooling([(i.prompt, i.params) for i in inputs], use_tqdm)
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        embedded = dict(zip(texts, self.embed(texts, use_tqdm=use_tqdm)))
        return [PoolingRequestOutput(
            f"score-{i}", None,
            embedded[q].prompt_token_ids + embedded[d].prompt_token_ids,
            PoolingOutput([cosine(embedded[q].outputs.embedding,
                                  embedded[d].outputs.embedding)]))
            for i, (q, d) in enumerate(pairs)]

    def _run_pooling(self, inputs: list[tuple[PromptType, PoolingParams]],
                     use_tqdm: bool) -> list[PoolingRequestOutput]:
        """Queue the inputs longest first, as sentence-transformers sorts its batches: each step
        then holds sequences of similar lengths, whose attention pads little (a pooling
        request's result does not depend on what it is batched with). Outputs come back in
        the inputs' order."""
        engine = self.llm_engine
        order = sorted(range(len(inputs)), key=lambda i: -_prompt_size(inputs[i][0]))
        request_ids: dict[int, str] = {}
        try:
            for i in order:
                prompt, params = inputs[i]
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, params)
                request_ids[i] = request_id
        except Exception:
            engine.abort_request(list(request_ids.values()))  # all or none, as in generate
            raise
        outputs = self._run([request_ids[i] for i in range(len(inputs))], use_tqdm)
        failed = [o for o in outputs if o.finish_reason != "stop"]
        if failed:
            raise RuntimeError(f"{len(failed)} pooling request(s) ended with "
                               f"{failed[0].finish_reason!r}")
        return outputs

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        started, output_tokens = time.perf_counter(), 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if isinstance(output, RequestOutput):
                            output_tokens += len(output.outputs[0].token_ids)
                        bar.update(1)
                        rate = output_tokens / max(time.perf_counter() - started, 1e-9)
                        bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]
