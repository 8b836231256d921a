"""Prompt -> validated engine Request: tokenize, check every length and id, resolve defaults."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.core.request import Request
from pagedllm.inputs import PromptType
from pagedllm.lora.registry import LoRARegistry
from pagedllm.lora.request import LoRARequest
from pagedllm.pooling_params import PoolerConfig, PoolingParams
from pagedllm.sampling_params import SamplingParams, check_text
from pagedllm.structured_output.grammar import grammar_key, parse_grammar
from pagedllm.tokenizer import max_chars_per_token

# what a pooling request carries as its (unused) sampling parameters: one step, nothing sampled
POOLING_SAMPLING = SamplingParams(max_tokens=1, detokenize=False)


@dataclass(slots=True)
class PoolingSetup:
    """What the input processor checks pooling requests against (runner "pooling")."""

    config: PoolerConfig
    tasks: tuple[str, ...]
    hidden_size: int
    max_model_len: int
    max_num_batched_tokens: int  # a prompt that runs whole must fit in one step
    causal: bool  # a decoder: its prompt may be computed in chunks over several steps

    def chunkable(self, params: PoolingParams) -> bool:
        """May the prompt run in chunks? Only where the pooled rows are all in the last chunk
        and attention is causal: a decoder's last-token pooling."""
        pooling_type = params.pooling_type or self.config.pooling_type
        if params.task in ("classify", "score"):
            pooling_type = self.config.pooling_type
        return self.causal and pooling_type == "LAST"

    def max_input_tokens(self, whole_prompt: bool) -> int:
        if whole_prompt:
            return min(self.max_model_len, self.max_num_batched_tokens)
        return self.max_model_len


class Processor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, cache_tokens: int,
                 eos_token_ids: list[int], loras: LoRARegistry | None = None,
                 pooling: PoolingSetup | None = None) -> None:
        self.tokenizer = tokenizer
        self.pooling = pooling  # None: the model generates (runner "generate")
        # the adapters requests may name; the default one refuses every adapter (LoRA off)
        self.loras = loras or LoRARegistry(enabled=False, max_lora_rank=0, modules={})
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.cache_tokens = cache_tokens  # the whole KV cache, in tokens
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.extra_stop_ids = set(eos_token_ids[1:])  # e.g. Llama 3's end-of-turn ids
        # Text longer than this cannot fit in max_model_len tokens: rejected untokenized.
        self.max_prompt_chars = (max_model_len * max_chars_per_token(tokenizer)
                                 if tokenizer is not None else None)

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
                arrival_time: float | None = None, default_max_tokens: int | None = None,
                lora_request: LoRARequest | None = None) -> tuple[Request, str | None]:
        """Returns the engine request and the prompt text (None for a token-id prompt).
        Without max_tokens a request may fill the context, or `default_max_tokens` if less."""
        if self.pooling is not None:
            raise ValueError(f"this model runs as a pooling model (runner 'pooling'): it serves "
                             f"{', '.join(self.pooling.tasks)} requests, not text generation")
        self.loras.check(lora_request)
        text, token_ids = self.tokenize(prompt)
        self._check_token_ids(token_ids)
        params = (params or SamplingParams()).clone()
        max_tokens = self._resolve_max_tokens(len(token_ids), params.max_tokens,
                                              default_max_tokens)
        params.eos_token_id = self.eos_token_id
        self._check_token_params(params)
        if not params.ignore_eos:
            params.all_stop_token_ids |= self.extra_stop_ids
        if params.detokenize and self.tokenizer is None:
            raise ValueError("detokenize=True needs a tokenizer; this engine was started with "
                             "skip_tokenizer_init=True, so pass SamplingParams(detokenize=False)")
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and not isinstance(salt, str):
            raise ValueError("cache_salt must be a string")
        if salt is not None:
            check_text(salt, "cache_salt")
        if params.best_of > self.cache_tokens:  # each sequence needs a KV slot of its own
            raise ValueError(f"best_of (or n) is {params.best_of}: more sequences than the KV "
                             f"cache has slots ({self.cache_tokens})")
        for name in ("top_k", "logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name} must be at most the vocabulary size "
                                 f"({self.vocab_size}), got {value}")
        request = Request(request_id, token_ids, params, max_tokens, cache_salt=salt,
                          lora_request=lora_request)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        return request, text

    def process_pooling(self, request_id: str, prompt: PromptType, params: PoolingParams,
                        arrival_time: float | None = None) -> tuple[Request, str | None]:
        """A pooling request (embed, encode, classify, score): its whole prompt must fit in
        max_model_len and in one step's token budget, since it runs in one forward pass."""
        setup = self.pooling
        if setup is None:
            raise ValueError(f"this model generates text; {params.task} requests need a pooling "
                             f"model: start the engine with runner='pooling' (--runner pooling)")
        if params.task not in setup.tasks:
            raise ValueError(f"this model does not support the {params.task!r} task (it "
                             f"supports {', '.join(setup.tasks)})")
        setup.config.check_dimensions(params.dimensions, setup.hidden_size)
        text, token_ids = self.tokenize(prompt)
        params = params.clone()
        params.whole_prompt = not setup.chunkable(params)
        self._check_token_ids(token_ids, limit=setup.max_input_tokens(params.whole_prompt))
        if params.token_type_ids is not None and len(params.token_type_ids) != len(token_ids):
            raise ValueError(f"token_type_ids has {len(params.token_type_ids)} entries for "
                             f"{len(token_ids)} tokens")
        request = Request(request_id, token_ids, POOLING_SAMPLING, 1, pooling_params=params)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        return request, text

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string or a dict, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty")
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; with skip_tokenizer_init=True "
                             "pass {'prompt_token_ids': [...]} instead")
        self.check_prompt_text(prompt)
        return prompt, self.tokenizer.encode(prompt)

    def check_prompt_text(self, text: str, name: str = "prompt") -> None:
        """ValueError for text that is not valid Unicode or too long to fit max_model_len
        tokens whatever it says: cheap checks, so run them before tokenizing."""
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise ValueError(f"the {name} is {len(text)} characters long: more than "
                             f"max_model_len ({self.max_model_len}) tokens can hold (at most "
                             f"{self.max_prompt_chars} characters for this tokenizer)")
        check_text(text, name)

    def _check_token_params(self, params: SamplingParams) -> None:
        for name, ids in (("logit_bias", params.logit_bias or {}),
                          ("allowed_token_ids", params.allowed_token_ids or []),
                          ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{name} has token ids outside [0, {self.vocab_size}): {bad[:5]}")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs a tokenizer (the grammar is matched "
                                 "against token texts); this engine has skip_tokenizer_init=True")
            # Parsed here too, so that a bad constraint is the caller's ValueError even when
            # the engine core runs in another process (which compiles it, from a cache by key).
            parse_grammar(grammar_key(params.structured_outputs))
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words needs a tokenizer")
            params.bad_words_token_ids = self._bad_word_sequences(params.bad_words)

    def _bad_word_sequences(self, words: list[str]) -> list[list[int]]:
        """Each word as tokens both at the start of text and after a space, as vLLM does."""
        sequences: dict[tuple[int, ...], None] = {}  # ordered and deduplicated in linear time
        for word in words:
            for variant in (word.strip(), " " + word.strip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids:
                    sequences.setdefault(tuple(ids))
        return [list(ids) for ids in sequences]

    def _check_token_ids(self, token_ids: list[int], limit: int | None = None) -> None:
        """`limit`: a pooling input's most tokens (it needs no room to generate)."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}); "
                             f"got {bad[:5]}")
        if limit is not None:
            if len(token_ids) > limit:
                limit_by = ("max_model_len" if limit == self.max_model_len else
                            "max_num_batched_tokens, the step's budget, since it runs in one "
                            "step")
                raise ValueError(f"the input is {len(token_ids)} tokens long, more than this "
                                 f"pooling model takes ({limit} tokens: {limit_by})")
            return
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt is {len(token_ids)} tokens long, but max_model_len is "
                             f"{self.max_model_len} (the prompt must leave room for one token)")

    def _resolve_max_tokens(self, prompt_len: int, max_tokens: int | None,
                            default_max_tokens: int | None = None) -> int:
        if max_tokens is None:
            max_tokens = min(self.max_model_len, self.cache_tokens) - prompt_len
            if max_tokens < 1:
                raise ValueError(f"the prompt ({prompt_len} tokens) leaves no room to generate: "
                                 f"the KV cache holds {self.cache_tokens} tokens")
            if default_max_tokens is not None:
                max_tokens = min(max_tokens, default_max_tokens)
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) "
                             f"is {total} tokens, more than max_model_len ({self.max_model_len})")
        if total > self.cache_tokens:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) "
                             f"is {total} tokens, more than the whole KV cache holds "
                             f"({self.cache_tokens} tokens)")
        return max_tokens
