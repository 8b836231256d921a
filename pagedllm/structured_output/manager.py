"""StructuredOutputManager: compiled grammars shared by key, one matcher per constrained sequence.

    add_request   parse the constraint now (a bad one is a ValueError), compile it on a
                  worker thread, or reuse the compiled grammar of an equal key
    poll          each step, before scheduling: requests whose grammar has compiled get their
                  matchers and may be scheduled; a failed compile ends its request
    start_bitmask after scheduling: fill the bitmasks of every constrained sequence that samples
                  this step, in one batched call on a helper thread, while the model runs; the
                  GrammarBitmask it returns rides in the SchedulerOutput to the worker, which
                  waits for the fill once the logits exist and applies it (bitmask.py)
    accept_tokens after sampling: advance the matchers; report the sequences whose grammar has
                  terminated (or, if the other constraints left no legal token, rejected one)

A constraint with `start_after` (a reasoning model's `</think>`) gets its matcher at once but
stays dormant, neither masked nor advanced, until that marker's tokens have been sampled.

Filling a bitmask takes microseconds in most states but milliseconds per sequence in some
(inside a length-bounded JSON string, for one), which is why it overlaps the forward pass:
xgrammar releases the GIL while it fills. Compiles run on a pool of their own, so a long
compile never delays a fill. Everything else runs on the engine thread. Nothing here touches
an unconstrained request: each method returns at once while no constrained sequence exists.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pagedllm.core.step_io import EngineCoreOutput, ScheduledRequest
from pagedllm.logger import init_logger
from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output.bitmask import GrammarBitmask, allocate_bitmask
from pagedllm.structured_output.grammar import (
    GrammarKey,
    clean_error,
    grammar_key,
    load_xgrammar,
    parse_grammar,
)

if TYPE_CHECKING:
    import xgrammar

logger = init_logger(__name__)

MAX_CACHED_GRAMMARS = 256  # compiled grammars kept for reuse, least recently used dropped first


@dataclass(slots=True)
class PendingGrammar:
    """A request whose grammar is still compiling, and the sequences that will need it."""

    key: GrammarKey
    compiled: concurrent.futures.Future
    sequence_ids: list[str]
    start_after: str | None  # the marker the grammar waits for, if any


@dataclass(slots=True)
class Dormant:
    """A sequence whose grammar waits for a marker in its output (structured_outputs
    .start_after, e.g. the end of its reasoning): the marker's token ids, and as many of the
    latest output tokens, to find the marker even when it arrives across steps."""

    marker: tuple[int, ...]
    tail: list[int] = field(default_factory=list)

    def feed(self, token_ids: list[int]) -> list[int] | None:
        """None while the marker has not appeared; once it has, the tokens after it (the first
        ones the grammar must accept)."""
        for i, token_id in enumerate(token_ids):
            self.tail.append(token_id)
            del self.tail[: -len(self.marker)]
            if tuple(self.tail) == self.marker:
                return token_ids[i + 1:]
        return None


@dataclass(slots=True)
class GrammarVerdict:
    """A sequence whose grammar ended it after this step's token."""

    request_id: str
    rejected: bool  # the sampled token broke the grammar (no legal token was left)


@dataclass(slots=True)
class PollResult:
    ready: list[str] = field(default_factory=list)  # request ids that may be scheduled now
    failed: dict[str, list[str]] = field(default_factory=dict)  # request id -> its sequence ids


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 max_workers: int = 1) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids  # EOS (and end-of-turn ids): legal only at the end
        self.max_workers = max_workers
        self._compiler: xgrammar.GrammarCompiler | None = None  # built on first use
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None  # compiles
        self._fill_thread: concurrent.futures.ThreadPoolExecutor | None = None  # bitmask fills
        self._fill: GrammarBitmask | None = None  # this step's, until the matchers move on
        self._batch_matcher: xgrammar.BatchGrammarMatcher | None = None
        self._grammars: OrderedDict[GrammarKey, concurrent.futures.Future] = OrderedDict()
        self._pending: dict[str, PendingGrammar] = {}  # request id -> its compiling grammar
        self._matchers: dict[str, xgrammar.GrammarMatcher] = {}  # sequence id -> its matcher
        self._dormant: dict[str, Dormant] = {}  # sequences whose grammar waits for a marker
        self._fill_buffer: torch.Tensor | None = None  # rows in sequence order, kept across steps
        self.num_compiles = 0  # grammars compiled (cache misses), for tests and stats

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, sequence_ids: list[str],
                    params: StructuredOutputsParams) -> bool:
        """Start (or reuse) the request's grammar; True if it is compiled already, so the
        request may be scheduled now. Raises ValueError for an invalid constraint (or one
        whose compile has already failed)."""
        key = grammar_key(params)
        compiled = self._grammars.get(key)
        if compiled is None:
            grammar = parse_grammar(key)  # raises ValueError before anything is recorded
            compiled = self._compile(grammar)
            self._grammars[key] = compiled
            if len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(key)
        self._pending[request_id] = PendingGrammar(key, compiled, list(sequence_ids),
                                                   params.start_after)
        if not compiled.done():
            return False
        error = self._start(request_id)
        if error is not None:
            raise ValueError(f"compiling the grammar for structured outputs failed: {error}")
        return True

    def remove(self, sequence_ids: list[str]) -> None:
        """Forget finished or aborted sequences (unknown ids are ignored). A request's own id
        is its first sequence's, so this also drops a request still compiling."""
        if not self.active:
            return
        self._settle()
        for sequence_id in sequence_ids:
            self._matchers.pop(sequence_id, None)
            self._dormant.pop(sequence_id, None)
            self._pending.pop(sequence_id, None)

    @property
    def active(self) -> bool:
        """Is any constrained sequence in flight (compiling or running)?"""
        return bool(self._matchers or self._pending)

    @property
    def has_pending(self) -> bool:
        """Is any request waiting for its grammar to compile?"""
        return bool(self._pending)

    # ---- compiling ------------------------------------------------------------------------------
    def _compile(self, grammar: xgrammar.Grammar) -> concurrent.futures.Future:
        self.num_compiles += 1
        return self._pool().submit(self._ensure_compiler().compile_grammar, grammar)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.max_workers, thread_name_prefix="pagedllm-grammar")
        return self._executor

    def _ensure_compiler(self) -> xgrammar.GrammarCompiler:
        """Built on the engine thread the first time (about 0.3 s for the vocabulary), so that
        the tokenizer is only ever read by the thread that also encodes with it."""
        if self._compiler is None:
            xgrammar = load_xgrammar()
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
            # Our own cache (by GrammarKey) decides reuse; xgrammar's would keep a second copy.
            self._compiler = xgrammar.GrammarCompiler(
                info, max_threads=max(1, (os.cpu_count() or 2) // 2), cache_enabled=False)
            self._batch_matcher = xgrammar.BatchGrammarMatcher()
        return self._compiler

    def poll(self) -> PollResult:
        """Start the requests whose grammar finished compiling since the last step."""
        result = PollResult()
        for request_id in [r for r, p in self._pending.items() if p.compiled.done()]:
            sequence_ids = self._pending[request_id].sequence_ids
            if self._start(request_id) is None:
                result.ready.append(request_id)
            else:
                result.failed[request_id] = sequence_ids
        return result

    def _start(self, request_id: str) -> str | None:
        """The request's grammar is done compiling: give each sequence its matcher. If the
        compile failed, the reason (the request keeps no grammar state then)."""
        pending = self._pending.pop(request_id)
        error = pending.compiled.exception()
        if error is not None:
            self._grammars.pop(pending.key, None)  # a later request may try again
            logger.error("compiling the grammar of request %s failed: %s", request_id, error)
            return clean_error(error)
        matcher = load_xgrammar().GrammarMatcher
        for sequence_id in pending.sequence_ids:
            self._matchers[sequence_id] = matcher(pending.compiled.result())
            if pending.start_after is not None:
                self._dormant[sequence_id] = Dormant(self._marker_ids(pending.start_after))
        return None

    def _marker_ids(self, marker: str) -> tuple[int, ...]:
        """The marker as the model writes it: one token for a special token such as Qwen3's
        and DeepSeek-R1's `</think>`, else the tokenizer's own split of the text."""
        return tuple(self.tokenizer.encode(marker, add_special_tokens=False))

    def wait_for_compile(self, timeout: float) -> None:
        """Block until a pending grammar compiles (or `timeout`): for a step that had nothing
        else to run, so the loop sleeps instead of spinning against the compiling thread."""
        futures = [p.compiled for p in self._pending.values()]
        if futures:
            concurrent.futures.wait(futures, timeout, concurrent.futures.FIRST_COMPLETED)

    # ---- the step -------------------------------------------------------------------------------
    def start_bitmask(self, scheduled: list[ScheduledRequest]) -> GrammarBitmask | None:
        """Begin filling the bitmasks of the constrained sequences that sample this step; None
        when none does."""
        if not self._matchers:
            return None
        self._settle()
        sequence_ids = [sample_id for s in scheduled if s.sample for sample_id in s.sample_ids
                        if sample_id in self._matchers and sample_id not in self._dormant]
        if not sequence_ids:
            return None
        self._fill_buffer = self._grown(self._fill_buffer, len(sequence_ids))
        bitmask = self._fill_buffer[: len(sequence_ids)]
        matchers = [self._matchers[s] for s in sequence_ids]
        if self._fill_thread is None:
            self._fill_thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="pagedllm-bitmask")
        done = self._fill_thread.submit(self._batch_matcher.batch_fill_next_token_bitmask,
                                        matchers, bitmask)
        self._fill = GrammarBitmask(sequence_ids, bitmask, done)
        return self._fill

    def _grown(self, buffer: torch.Tensor | None, rows: int) -> torch.Tensor:
        """`buffer`, or a new one twice as large when it has fewer than `rows` rows."""
        if buffer is not None and buffer.shape[0] >= rows:
            return buffer
        size = max(rows, 8, 2 * (0 if buffer is None else buffer.shape[0]))
        return allocate_bitmask(size, self.vocab_size)

    def _settle(self) -> None:
        """Wait for a fill that nobody applied (a step that failed, or sampled nothing) before
        the matchers change: the fill thread reads them."""
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill.wait()

    def accept_tokens(self, outputs: list[EngineCoreOutput]) -> list[GrammarVerdict]:
        """Advance each constrained sequence by its new tokens; the verdicts name those whose
        grammar has now terminated (its stop token accepted) or that broke it."""
        if not self._matchers:
            return []
        self._settle()
        verdicts = []
        for output in outputs:
            matcher = self._matchers.get(output.request_id)
            if matcher is None:
                continue
            token_ids = self._awake_tokens(output.request_id, output.new_token_ids)
            if not all(matcher.accept_token(t) for t in token_ids):
                logger.warning("request %s sampled a token its grammar does not allow (its "
                               "other constraints left none); ending it", output.request_id)
                verdicts.append(GrammarVerdict(output.request_id, rejected=True))
            elif matcher.is_terminated():
                verdicts.append(GrammarVerdict(output.request_id, rejected=False))
        return verdicts

    def _awake_tokens(self, sequence_id: str, token_ids: list[int]) -> list[int]:
        """The new tokens the sequence's grammar must accept: all of them, except while it
        waits for its marker (then those after the marker, if it came in this step)."""
        dormant = self._dormant.get(sequence_id)
        if dormant is None:
            return token_ids
        after = dormant.feed(token_ids)
        if after is None:
            return []
        del self._dormant[sequence_id]
        return after
