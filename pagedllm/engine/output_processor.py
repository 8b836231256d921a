"""Engine-core outputs -> RequestOutputs: detokenize incrementally, apply stop strings, and
shape each update as the request asked (cumulative, delta for streaming, or final only)."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

from pagedllm.core.step_io import EngineCoreOutput, TokenLogprobs
from pagedllm.logger import init_logger
from pagedllm.outputs import (
    CompletionOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    RequestMetrics,
    RequestOutput,
)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = init_logger(__name__)


class IncrementalDetokenizer:
    """Text for each new token in O(1): tokenizers' DecodeStream holds back split UTF-8 bytes.

    The stream is primed with the prompt's last tokens so that the first generated token is
    decoded in context (e.g. a leading space is kept exactly as a full decode would give it).
    """

    PROMPT_CONTEXT = 4

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer
        context = prompt_token_ids[-self.PROMPT_CONTEXT :]
        self.stream = DecodeStream(context, skip_special_tokens)

    def add(self, token_id: int) -> str:
        return self.stream.step(self.backend, token_id) or ""


def find_stop_string(text: str, stops: list[str], search_from: int) -> tuple[int, str] | None:
    """Earliest stop string that occurs in text at or after search_from."""
    best = None
    for stop in stops:
        index = text.find(stop, max(0, search_from))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


class SequenceState:
    """One generated sequence: its tokens, text, logprobs and how it ended."""

    def __init__(self, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer) -> None:
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self.detokenizer = (IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                                   params.skip_special_tokens)
                            if params.detokenize and tokenizer is not None else None)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_text = 0  # characters / tokens already given out (DELTA)
        self.sent_tokens = 0
        # While streaming, hold back text that might turn out to begin a stop string.
        longest = max((len(s) for s in params.stop), default=0)
        self.holdback = 0 if params.include_stop_str_in_output else max(0, longest - 1)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, output: EngineCoreOutput) -> bool:
        """Take the new tokens; returns True if a stop string ended the sequence here."""
        if self.detokenizer is None or not self.params.stop:
            self.token_ids.extend(output.new_token_ids)
            self._add_logprobs(output.new_logprobs)
            if self.detokenizer is not None:
                self.text += "".join(self.detokenizer.add(t) for t in output.new_token_ids)
            stopped_by_string = False
        else:
            stopped_by_string = self._take_until_stop(output)
        if output.finish_reason is not None and not stopped_by_string:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason
        return stopped_by_string

    def _take_until_stop(self, output: EngineCoreOutput) -> bool:
        """One token at a time, up to the one that completes a stop string: a step may bring
        several (speculative decoding), and the tokens after a stop are not the output's."""
        for token_id, entry in zip(output.new_token_ids, output.new_logprobs):
            self.token_ids.append(token_id)
            self._add_logprobs([entry])
            new_text = self.detokenizer.add(token_id)
            self.text += new_text
            if self._check_stop_strings(len(new_text)):
                return True
        return False

    def _check_stop_strings(self, new_chars: int) -> bool:
        stops = self.params.stop
        if not stops or len(self.token_ids) < self.params.min_tokens:
            return False
        longest = max(len(s) for s in stops)
        hit = find_stop_string(self.text, stops, len(self.text) - new_chars - longest + 1)
        if hit is None:
            return False
        index, stop = hit
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.text = self.text[:end]
        self.finish_reason, self.stop_reason = "stop", stop
        return True

    def _add_logprobs(self, new: list[TokenLogprobs | None]) -> None:
        for entry in new:
            if entry is None:
                continue
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + entry.logprobs[0]
            if self.logprobs is not None:
                self.logprobs.append(logprob_dict(entry, self.tokenizer))

    def completion(self, kind: RequestOutputKind, index: int) -> CompletionOutput:
        visible = len(self.text) if self.finished else max(0, len(self.text) - self.holdback)
        if kind == RequestOutputKind.DELTA:
            visible = max(visible, self.sent_text)
            text = self.text[self.sent_text : visible]
            token_ids = self.token_ids[self.sent_tokens :]
            logprobs = self.logprobs[self.sent_tokens :] if self.logprobs is not None else None
            self.sent_text, self.sent_tokens = visible, len(self.token_ids)
        else:
            text, token_ids, logprobs = self.text[:visible], list(self.token_ids), self.logprobs
        return CompletionOutput(
            index=index, text=text, token_ids=token_ids,
            cumulative_logprob=self.cumulative_logprob, logprobs=logprobs,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
        )


def logprob_dict(entry: TokenLogprobs, tokenizer) -> dict[int, Logprob]:
    """The sampled (or actual) token first with its rank, then the top-k by rank."""
    result = {}
    for position, (token_id, value) in enumerate(zip(entry.token_ids, entry.logprobs)):
        if token_id in result:
            continue
        rank = entry.sampled_rank if position == 0 else position
        text = token_text(tokenizer, token_id) if tokenizer is not None else None
        result[token_id] = Logprob(value, rank, text)
    return result


# tokenizer -> token id -> its text; at most the vocabulary per tokenizer
_TOKEN_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_text(tokenizer, token_id: int) -> str:
    """One token's text, decoded once per tokenizer and id: logprobs name up to 21 tokens per
    position (prompt logprobs of a long prompt: 100,000s), mostly the same few thousand."""
    texts = _TOKEN_TEXTS.get(tokenizer)
    if texts is None:
        texts = _TOKEN_TEXTS[tokenizer] = {}
    text = texts.get(token_id)
    if text is None:
        text = texts[token_id] = tokenizer.decode([token_id])
    return text


class RequestState:
    """A request as its caller sees it: best_of sequences (usually one), of which n are given."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer, arrival_time: float) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.sequences = [SequenceState(i, prompt_token_ids, params, tokenizer)
                          for i in range(params.best_of)]
        # one entry per prompt token; the first has no context, so no logprob (as in vLLM)
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)

    def update(self, index: int, output: EngineCoreOutput) -> bool:
        now = time.monotonic()
        self.metrics.first_token_time = self.metrics.first_token_time or now
        self.metrics.last_token_time = now
        self.num_cached_tokens = output.num_cached_tokens
        stopped = self.sequences[index].update(output)
        if self.finished:
            self.metrics.finished_time = now
        return stopped

    def add_prompt_logprobs(self, first_position: int, entries: list[TokenLogprobs]) -> None:
        if self.prompt_logprobs is None:
            return
        for offset, entry in enumerate(entries):
            # a recomputed (preempted) prompt yields its entries again: keep the first ones
            if first_position + 1 + offset == len(self.prompt_logprobs):
                self.prompt_logprobs.append(logprob_dict(entry, self.tokenizer))

    def make_output(self, index: int) -> RequestOutput | None:
        """The update to deliver after sequence `index` moved, in the request's output kind."""
        kind = self.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not self.finished:
            return None
        if kind == RequestOutputKind.DELTA and self.params.n == self.params.best_of:
            completions = [self.sequences[index].completion(kind, index)]
        elif self.params.best_of > self.params.n:
            if not self.finished:
                return None  # which n are best is known only at the end
            completions = self._best_completions(kind)
        else:
            completions = [seq.completion(kind, seq.index) for seq in self.sequences]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions,
                             finished=self.finished, metrics=self.metrics,
                             num_cached_tokens=self.num_cached_tokens,
                             prompt_logprobs=self.prompt_logprobs)

    def _best_completions(self, kind: RequestOutputKind) -> list[CompletionOutput]:
        ranked = sorted(self.sequences, key=lambda seq: seq.cumulative_logprob or 0.0,
                        reverse=True)
        return [seq.completion(kind, i) for i, seq in enumerate(ranked[: self.params.n])]


@dataclass(slots=True)
class PoolingState:
    """A pooling request in flight: what its one output repeats of its input."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]

    def output(self, output: EngineCoreOutput) -> PoolingRequestOutput:
        return PoolingRequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                                    PoolingOutput(output.pooled or []),
                                    finish_reason=output.finish_reason or "stop")


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._sequences: dict[str, tuple[RequestState, int]] = {}  # sequence id -> its request

    def add_pooling_request(self, request_id: str, prompt: str | None,
                            prompt_token_ids: list[int]) -> None:
        """Register a pooling request: it answers once, with its pooled result."""
        self.states[request_id] = PoolingState(request_id, prompt, prompt_token_ids)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> list[str]:
        """Register a request; returns the ids of its sequences (the request's own first)."""
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer,
                             arrival_time)
        self.states[request_id] = state
        ids = [sequence_id(request_id, i) for i in range(params.best_of)]
        for index, seq_id in enumerate(ids):
            self._sequences[seq_id] = (state, index)
        return ids

    def abort(self, request_ids: list[str]) -> list[str]:
        """Forget the requests; returns every sequence id they had, for the scheduler."""
        sequence_ids = []
        for request_id in request_ids:
            state = self.states.pop(request_id, None)
            if isinstance(state, RequestState):
                sequence_ids += self._forget(state)
        return sequence_ids

    def _forget(self, state: RequestState) -> list[str]:
        ids = [sequence_id(state.request_id, i) for i in range(len(state.sequences))]
        for seq_id in ids:
            self._sequences.pop(seq_id, None)
        return ids

    def add_prompt_logprobs(self, chunks: dict[str, tuple[int, list]] | None) -> None:
        for request_id, (first_position, entries) in (chunks or {}).items():
            state = self.states.get(request_id)
            if state is not None:
                state.add_prompt_logprobs(first_position, entries)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs to deliver and the sequences that stop strings ended."""
        results, stopped = [], []
        for output in outputs:
            state = self.states.get(output.request_id)
            if isinstance(state, PoolingState):
                del self.states[output.request_id]
                results.append(state.output(output))
                continue
            entry = self._sequences.get(output.request_id)
            if entry is None:
                continue
            state, index = entry
            if state.sequences[index].finished:
                # A core in another process may run a sequence for a step or two after the
                # front-end finished it (a stop string): those tokens come after the end.
                continue
            try:
                result = self._advance(state, index, output, stopped)
            except Exception as exc:  # its own text or parameters broke it: end it alone
                result = self._fail(state, exc, stopped)
            if result is not None:
                results.append(result)
            if state.finished:
                del self.states[state.request_id]
                self._forget(state)
        return results, stopped

    @staticmethod
    def _advance(state: RequestState, index: int, output: EngineCoreOutput,
                 stopped: list[str]) -> RequestOutput | None:
        if state.update(index, output):
            stopped.append(output.request_id)
        if output.finish_reason == "error":  # one sequence failed alone: so does its request
            _end_siblings(state, "error", stopped)
        return state.make_output(index)

    @staticmethod
    def _fail(state: RequestState, exc: Exception, stopped: list[str]) -> RequestOutput:
        """End every unfinished sequence of the request with "error" (the core is told to end
        them too, through `stopped`); the caller gets one final output saying so."""
        logger.error("request %s ended with an error while its output was processed: %s: %s",
                     state.request_id, type(exc).__name__, exc)
        _end_siblings(state, "error", stopped)
        completions = [CompletionOutput(i, "", [], finish_reason=state.sequences[i].finish_reason)
                       for i in range(state.params.n)]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions,
                             finished=True, metrics=state.metrics)


def _end_siblings(state: RequestState, reason: str, ended: list[str]) -> None:
    """Finish every unfinished sequence of the request with `reason`; their ids go to `ended`
    so that the core stops them too."""
    for seq in state.sequences:
        if not seq.finished:
            seq.finish_reason = reason
            ended.append(sequence_id(state.request_id, seq.index))


def sequence_id(request_id: str, index: int) -> str:
    """The engine id of a request's index-th sequence; the first keeps the request's id."""
    return request_id if index == 0 else f"{request_id}#{index}"
