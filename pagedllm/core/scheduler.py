"""Continuous batching with one token budget per step.

Each step hands out at most `max_num_batched_tokens` tokens. Running requests come first, in
the running list's order; each gets all the tokens it still has to compute (one for a decode, a
chunk for a prompt) as far as the budget lasts. Then waiting requests are admitted in the
waiting queue's order (oldest first under fcfs) while the budget, the sequence cap and the free
blocks allow. There is no separate prefill or decode phase: a request just has
`num_computed_tokens` out of `num_tokens`. A waiting request whose structured-output grammar is
still compiling is passed over until it has compiled.

When a running request needs a block and none is free, the last request of the running list
(the most recently admitted, under fcfs) is preempted: its blocks are freed and it goes back to
the waiting queue, ahead of newer requests of its rank, to be recomputed (prompt plus the tokens
it had generated) when memory allows. With preemption_mode="swap" its blocks are copied to host
memory instead and copied back when it resumes, so it keeps its computed tokens (recompute is
the fallback when the host pool is full).

LoRA: a step runs at most `max_loras` distinct adapters (the worker has that many slots). The
adapters of the running requests are the step's; a waiting request under another adapter is
admitted only while fewer than max_loras are running, else it is passed over (it keeps its place)
and the requests behind it may still be admitted. When the running requests under an adapter
finish, its place goes to the next waiting adapter; with nothing running, any request is
admitted, so no adapter waits forever behind a full set.

Three knobs shape a step:
  long_prefill_token_threshold  caps the prompt tokens one request computes per step; and a
                                chunk always leaves one token of budget for each running request
                                behind it, so decodes are never starved by a long prompt.
  scheduling_policy="priority"  the waiting queue is a heap on (priority, arrival) and the
                                running list is kept in that order too, so its last entry, the
                                one preempted first, is the lowest-priority, latest arrival.
  preemption_mode               recompute or swap, as above.

Speculative decoding: a running request at its last token that holds draft tokens (proposed
by the worker after its last step) computes that token and its drafts as one short chunk,
within the same budget: 1 + k tokens, fewer drafts when the budget, max_tokens or
max_model_len is short. The runner verifies them; update_from_output appends the accepted ones
plus one more token, then rolls the rest back: num_computed_tokens goes back to the accepted
tokens and the blocks held only for rejected drafts are freed. The drafts never enter the
request's tokens, so no block hash ever covers one.

Every block copy the KV-cache manager causes while the step is scheduled (swap out, swap in,
copy-on-write) comes back from the call that caused it and goes into that step's
SchedulerOutput, which holds only copies of the core's state (see its docstring).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.request_queue import make_request_queue, priority_key
from pagedllm.core.stats import KVCacheStats, SpecDecodingStats
from pagedllm.core.step_io import (
    BlockCopy,
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedllm.logger import init_logger

logger = init_logger(__name__)

@dataclass(slots=True)
class StepCopies:
    """The block copies of the step being scheduled, (src, dst), by the runner's three kinds."""

    swap_out: list[BlockCopy] = field(default_factory=list)  # (device, host)
    swap_in: list[BlockCopy] = field(default_factory=list)  # (host, device)
    on_write: list[BlockCopy] = field(default_factory=list)  # copy-on-write, on the device


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting = make_request_queue(config.scheduling_policy)
        self.running: list[Request] = []
        self._finished_since_last_step: set[str] = set()
        self._failed: dict[str, str] = {}  # request id -> error, ended while being scheduled
        self.num_preemptions = 0
        self.num_swap_outs = 0  # requests swapped out / back in, over the scheduler's life
        self.num_swap_ins = 0
        # Block copies of the step being scheduled: handed whole to its SchedulerOutput.
        self._copies = StepCopies()
        # Requests in a step whose output has not come back. Under pipeline parallelism the
        # core keeps several steps in flight (engine/core.py); a request in one is not
        # scheduled again (its next token is not known yet) nor preempted until it returns.
        self.in_flight: set[str] = set()
        self.spec_decoding = SpecDecodingStats()  # drafts verified and accepted, since start-up
        # (draft tokens, accepted) of each sequence that verified drafts in the last update
        self.last_step_drafts: list[tuple[int, int]] = []

    # ---- intake -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.check_new_id(request.request_id)
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def check_new_id(self, request_id: str, also_taken: bool = False) -> None:
        """ValueError if the id is in use here (or `also_taken`: in use by the caller's own
        records, e.g. a beam search's id): the core's one duplicate-id check."""
        if also_taken or request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._free(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # By id, so that the engine never reaches into `requests`: a request leaves it when it
    # finishes (stopped, length or aborted).
    def is_unfinished(self, request_id: str) -> bool:
        return request_id in self.requests

    def unfinished_ids(self) -> list[str]:
        return list(self.requests)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def set_waiting_for_grammar(self, request_id: str, waiting: bool) -> None:
        """Hold a request back (True) until its grammar has compiled; an id that has finished
        meanwhile is ignored."""
        request = self.requests.get(request_id)
        if request is not None:
            request.waiting_for_grammar = waiting

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.request_id in self.in_flight:
                index += 1
                continue
            num_new = self._num_new_tokens(request, budget, reserve=len(self.running) - index - 1)
            try:
                room = self._make_room(request, num_new, preempted)
            except Exception as exc:  # this request's own data broke it: end it alone
                self._fail(request, exc)
                continue
            if not room:
                break  # the request itself was preempted: nothing after it is running now
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1

        # A step that had to preempt is short of memory: admitting more would only thrash.
        # (So a step never both swaps out and swaps in: no host block is freed and reused in it.)
        set_aside: list[Request] = []
        adapters = self._running_adapters()
        while not preempted and self.waiting and budget > 0 and self._has_seat():
            request = self.waiting.peek()
            # set aside, so the requests behind it still run: a grammar still compiling, or an
            # adapter that would exceed max_loras in this step
            if request.waiting_for_grammar or not self._lora_fits(request, adapters):
                set_aside.append(self.waiting.pop())
                continue
            try:
                num_new = self._admit(request, budget)
            except Exception as exc:  # this request's own data broke it: end it alone
                self._fail(request, exc)
                continue
            if num_new is None:
                break
            self.waiting.pop()
            request.status = RequestStatus.RUNNING
            self._add_running(request)
            if request.lora_int_id:
                adapters.add(request.lora_int_id)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        for request in reversed(set_aside):  # back where they were, in their order
            self.waiting.add_preempted(request)
        self.in_flight.update(s.request_id for s in scheduled)

        finished, self._finished_since_last_step = self._finished_since_last_step, set()
        failed, self._failed = self._failed, {}
        copies, self._copies = self._copies, StepCopies()
        return SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            finished_request_ids=finished,
            preempted_request_ids=preempted,
            block_copies=copies.on_write,
            blocks_to_swap_out=copies.swap_out,
            blocks_to_swap_in=copies.swap_in,
            failed=failed,
        )

    def _fail(self, request: Request, exc: Exception) -> None:
        """End a request whose own data raised while it was scheduled; the step goes on."""
        logger.error("request %s ended with an error while being scheduled: %s: %s",
                     request.request_id, type(exc).__name__, exc)
        self._failed[request.request_id] = f"{type(exc).__name__}: {exc}"
        self.finish_requests([request.request_id], RequestStatus.FINISHED_ERROR)

    def _running_adapters(self) -> set[int]:
        return {r.lora_int_id for r in self.running if r.lora_int_id}

    def _lora_fits(self, request: Request, adapters: set[int]) -> bool:
        """May `request` join a step that runs `adapters`? (Always, with LoRA off: max_loras 0
        and no adapter.)"""
        lora_id = request.lora_int_id
        return not lora_id or lora_id in adapters or len(adapters) < self.config.max_loras

    def lora_adapters(self) -> tuple[list[str], list[str]]:
        """The names of the adapters of the running and of the waiting requests (metrics)."""
        def names(requests: Iterable[Request]) -> list[str]:
            return sorted({r.lora_request.lora_name for r in requests if r.lora_request})

        return names(self.running), names(self.waiting)

    def _has_seat(self) -> bool:
        return len(self.running) < self.config.max_num_seqs

    def _num_new_tokens(self, request: Request, budget: int, reserve: int = 0,
                        num_hit: int = 0) -> int:
        """What `request` computes this step: all it has left (less `num_hit` prefix-cache
        tokens), at most long_prefill_token_threshold, and at most the budget less `reserve`
        (one token for each running request still to be served)."""
        num_new = request.num_tokens - request.num_computed_tokens - num_hit
        if num_new == 1 and request.spec_token_ids:
            num_new += self._num_drafts(request)
        threshold = self.config.long_prefill_token_threshold
        if threshold:
            num_new = min(num_new, threshold)
        return min(num_new, max(1, budget - reserve))

    def _num_drafts(self, request: Request) -> int:
        """How many of its drafts a request at its last token may verify: no run past
        max_model_len, nor past max_tokens (the step adds the accepted drafts plus one)."""
        room = min(self.config.max_model_len - request.num_tokens,
                   request.max_tokens - request.num_output_tokens - 1)
        return max(0, min(len(request.spec_token_ids), room))

    def _admit(self, request: Request, budget: int) -> int | None:
        """Give a waiting request its blocks: swap it back in, or take its cached prefix and
        allocate the rest. Returns its tokens for this step, or None if memory is short."""
        if self.kv.is_swapped(request.request_id):
            if not self.kv.swap_lost(request):
                return self._swap_in(request, budget)
            self.kv.free(request)  # a block it left on the device was evicted: recompute
            request.num_computed_tokens = 0
        cached = self.kv.get_computed_blocks(request)
        num_hit = len(cached) * self.kv.block_size
        num_new = self._num_new_tokens(request, budget, num_hit=num_hit)
        whole = request.pooling_params is not None and request.pooling_params.whole_prompt
        if whole and num_new < request.num_tokens - num_hit:
            return None  # this pooling prompt runs whole (bidirectional attention): next step
        copies = self.kv.allocate_slots(request, self._slots(request, num_new, num_hit), cached)
        if copies is None:
            return None
        self._copies.on_write.extend(copies)
        request.num_computed_tokens += num_hit
        request.num_cached_tokens = num_hit
        return num_new

    def _slots(self, request: Request, num_new: int, num_hit: int = 0) -> int:
        """Slots to hold for a chunk of `num_new` tokens: with a draft model, a chunk that
        samples holds num_lookahead_tokens more, where the draft writes its proposals' K/V."""
        ends = request.num_computed_tokens + num_hit + num_new >= request.num_tokens
        return num_new + self.config.num_lookahead_tokens if ends else num_new

    def _swap_in(self, request: Request, budget: int) -> int | None:
        num_new = self._num_new_tokens(request, budget)
        copies = self.kv.swap_in(request, num_new)
        if copies is None:
            return None
        from_host, on_write = copies
        self._copies.swap_in.extend(from_host)
        self._copies.on_write.extend(on_write)
        self.num_swap_ins += 1
        return num_new

    def _add_running(self, request: Request) -> None:
        if self.config.scheduling_policy == "priority":
            bisect.insort(self.running, request, key=priority_key)  # after equal keys
        else:
            self.running.append(request)

    def _make_room(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Allocate slots for `request`, preempting from the end of the running list if needed;
        False if that preempted `request` itself."""
        while (copies := self.kv.allocate_slots(request, self._slots(request, num_new))) is None:
            victim = self.running.pop(self._last_preemptible())
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        self._copies.on_write.extend(copies)
        return True

    def _last_preemptible(self) -> int:
        """Index of the last running request not in flight (the one being scheduled never
        is, so there always is one)."""
        index = len(self.running) - 1
        while self.running[index].request_id in self.in_flight:
            index -= 1
        return index

    def _preempt(self, request: Request) -> None:
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        request.spec_token_ids = []  # proposed for a cache it no longer has; new ones will come
        self.num_preemptions += 1
        if not self._swap_out(request):
            self.kv.free(request)
            request.num_computed_tokens = 0
        self.waiting.add_preempted(request)

    def _swap_out(self, request: Request) -> bool:
        """Copy the request's blocks to host memory, keeping its computed tokens; False when
        preemption recomputes, or the host pool has no room for it."""
        if self.config.preemption_mode != "swap":
            return False
        copies = self.kv.swap_out(request)
        if copies is None:
            return False
        self._copies.swap_out.extend(copies)
        self.num_swap_outs += 1
        return True

    # ---- statistics ---------------------------------------------------------------------------
    def kv_cache_stats(self) -> KVCacheStats:
        kv, pool, host = self.kv, self.kv.pool, self.kv.host_pool
        return KVCacheStats(
            num_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            block_size=kv.block_size,
            num_allocated_slots=(pool.num_blocks - pool.num_free_blocks) * kv.block_size,
            num_empty_slots=kv.num_empty_slots(self.running),
            prefix_cache_queries=kv.num_queried_tokens,
            prefix_cache_hits=kv.num_hit_tokens,
            num_evictions=pool.num_evictions,
            num_preemptions=self.num_preemptions,
            num_swap_outs=self.num_swap_outs,
            num_swap_ins=self.num_swap_ins,
            num_swapped_requests=kv.num_swapped_requests,
            num_host_blocks=host.num_blocks if host else 0,
            num_free_host_blocks=host.num_free_blocks if host else 0,
        )

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        """The request's row, holding copies only (SchedulerOutput's contract): the request's
        token lists grow, and its block table changes, after this step is handed out."""
        start = request.num_computed_tokens
        drafts = request.spec_token_ids[: max(0, start + num_new - request.num_tokens)]
        request.spec_token_ids = []  # verified now, or (cut by the budget) dropped
        sample = start + num_new - len(drafts) == request.num_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new] + drafts,  # copies
            start_position=start,
            block_ids=self.kv.block_ids(request.request_id),  # a copy, by its contract
            sampling_params=request.sampling_params,
            output_token_ids=list(request.output_token_ids),
            prompt_token_ids=list(request.prompt_token_ids),
            sample=sample,
            sample_ids=[request.request_id, *request.pending_fork_ids] if sample else [],
            lora_request=request.lora_request,
            spec_token_ids=drafts,
            pooling_params=request.pooling_params,
        )

    # ---- after the model ran ------------------------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        self.last_step_drafts = []
        for item in scheduler_output.scheduled:
            self.in_flight.discard(item.request_id)
            request = self.requests.get(item.request_id)
            if request is not None:  # may have been aborted while the model ran
                request.num_computed_tokens += len(item.token_ids)
                if item.spec_token_ids:
                    accepted = runner_output.accepted_token_ids.get(item.request_id, ())
                    self._roll_back(request, len(item.spec_token_ids), len(accepted))

        self._fork_sampled_siblings(runner_output.request_ids)
        outputs = self._error_outputs({**scheduler_output.failed, **runner_output.failed})
        outputs += self._finish_pooled(runner_output.pooled)
        logprobs = runner_output.logprobs or [None] * len(runner_output.request_ids)
        for request_id, token_id, token_logprobs in zip(
            runner_output.request_ids, runner_output.sampled_token_ids, logprobs
        ):
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            accepted = runner_output.accepted_token_ids.get(request_id, [])
            accepted_logprobs = (runner_output.accepted_logprobs.get(request_id)
                                 or [None] * len(accepted))
            output = self._append_tokens(request, [*accepted, token_id],
                                         [*accepted_logprobs, token_logprobs])
            if not request.status.finished:
                request.spec_token_ids = runner_output.draft_token_ids.get(request_id, [])
            outputs.append(output)
        return outputs

    def _roll_back(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """Forget the K/V of the drafts the runner rejected: their positions count as not
        computed, and blocks held only for them are freed (their slots get overwritten when
        the positions are computed for real)."""
        request.num_computed_tokens -= num_drafts - num_accepted
        self.kv.trim(request)
        self.spec_decoding.observe(num_drafts, num_accepted)
        self.last_step_drafts.append((num_drafts, num_accepted))

    def _append_tokens(self, request: Request, token_ids: list[int],
                       logprobs: list) -> EngineCoreOutput:
        """Append a step's tokens (one, or accepted drafts and one) up to the first stop."""
        count = 0
        for token_id in token_ids:
            request.append_output_token(token_id)
            count += 1
            stop = request.check_token_stop(self.config.max_model_len)
            if stop is not None:
                self.running.remove(request)
                self._free(request, stop)
                break
        return EngineCoreOutput(
            request.request_id, token_ids[:count], logprobs[:count],
            finish_reason=request.finish_reason, stop_reason=request.stop_reason,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _finish_pooled(self, pooled: dict[str, list]) -> list[EngineCoreOutput]:
        """Pooling requests end with their result, and their blocks are freed at once: no KV
        is kept after a pooling request."""
        outputs = []
        for request_id, result in pooled.items():
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            self.running.remove(request)
            self._free(request, RequestStatus.FINISHED_STOPPED)
            outputs.append(EngineCoreOutput(request_id, [], [], finish_reason="stop",
                                            pooled=result))
        return outputs

    def _error_outputs(self, failed: dict[str, str]) -> list[EngineCoreOutput]:
        """End (if still running) and report the sequences that failed alone this step."""
        for request_id, reason in failed.items():
            if self.is_unfinished(request_id):
                logger.error("request %s ended with an error: %s", request_id, reason)
        self.finish_requests(list(failed), RequestStatus.FINISHED_ERROR)
        return [EngineCoreOutput(request_id, [], [], finish_reason="error")
                for request_id in failed]

    def _fork_sampled_siblings(self, sampled_ids: list[str]) -> None:
        """A parallel-sampling request whose prompt just completed has its siblings sampled in
        the same step; they start here as forks that share all of its blocks."""
        for request_id in sampled_ids:
            request = self.requests.get(request_id)
            if request is None or not request.pending_fork_ids or request.status.finished:
                continue
            for child_id in reversed(request.pending_fork_ids):  # each lands right after it
                self.fork_request(request, child_id)
            request.pending_fork_ids = []

    def fork(self, parent_id: str, child_id: str) -> None:
        """Start `child_id` as a copy of the running request `parent_id` (beam search)."""
        self.fork_request(self.requests[parent_id], child_id)

    def fork_request(self, parent: Request, child_id: str) -> Request:
        """Start `child_id` as a copy of a running request, sharing all of its blocks."""
        child = parent.fork(child_id)
        self.requests[child_id] = child
        self.kv.fork(parent, child)
        self.running.insert(self.running.index(parent) + 1, child)
        return child

    def replace_last_token(self, request_id: str, token_id: int) -> None:
        """Swap the token sampled last, whose K/V is not computed yet (beam search picks its
        own continuations from the logprobs)."""
        request = self.requests[request_id]
        request.output_token_ids[-1] = token_id
        request.all_token_ids[-1] = token_id

    def _free(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_since_last_step.add(request.request_id)
