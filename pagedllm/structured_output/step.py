"""Structured outputs as a step feature (engine/features.py): the grammar manager's calls, placed
at the step's hooks."""

from __future__ import annotations

from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.step_io import EngineCoreOutput, SchedulerOutput
from pagedllm.engine.features import StepFeature
from pagedllm.structured_output.manager import StructuredOutputManager

# A step with nothing to run while grammars compile waits this long for one, instead of
# spinning (and slowing the compiling thread); short, so adds and aborts are not held up.
GRAMMAR_WAIT_S = 0.02


class StructuredOutputStep(StepFeature):
    """Grammars: compile off the loop, mask each step's logits, end a request its grammar ends."""

    def __init__(self, manager: StructuredOutputManager, scheduler: Scheduler) -> None:
        self.manager = manager
        self.scheduler = scheduler

    def on_add(self, request: Request) -> None:
        """Parse the request's constraint (ValueError if bad) and compile it off the step loop;
        until it has compiled, the scheduler passes the request over."""
        constraint = request.sampling_params.structured_outputs
        if constraint is None:
            return
        sequence_ids = [request.request_id, *request.pending_fork_ids]
        ready = self.manager.add_request(request.request_id, sequence_ids, constraint)
        request.waiting_for_grammar = not ready

    def before_schedule(self) -> list[EngineCoreOutput]:
        """Let the requests whose grammar has compiled be scheduled; a compile that failed
        (which parsing should have caught) ends its request's sequences with 'abort'."""
        if not self.manager.has_pending:
            return []
        polled = self.manager.poll()
        for request_id in polled.ready:
            self.scheduler.set_waiting_for_grammar(request_id, False)
        outputs = []
        for request_id, sequence_ids in polled.failed.items():
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
            outputs += [EngineCoreOutput(s, [], [], finish_reason="abort") for s in sequence_ids]
        return outputs

    def on_scheduled(self, scheduler_output: SchedulerOutput) -> None:
        if not scheduler_output.scheduled and self.manager.has_pending:
            self.manager.wait_for_compile(GRAMMAR_WAIT_S)
        scheduler_output.grammar = self.manager.start_bitmask(scheduler_output.scheduled)

    def after_update(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Advance the grammars by this step's tokens. A terminated grammar ends its request
        with "stop" (even under ignore_eos); a token the grammar rejects (possible only when
        other constraints left no legal token) is dropped, and the request stops there."""
        verdicts = self.manager.accept_tokens(outputs)
        by_id = {o.request_id: o for o in outputs} if verdicts else {}
        for verdict in verdicts:
            output = by_id[verdict.request_id]
            if verdict.rejected:
                output.new_token_ids, output.new_logprobs = [], []
            if output.finish_reason is None:
                output.finish_reason = "stop"
                self.scheduler.finish_requests([verdict.request_id],
                                               RequestStatus.FINISHED_STOPPED)
        if self.manager.active:
            self.manager.remove([o.request_id for o in outputs if o.finish_reason is not None])
        return outputs

    def on_finished(self, request_ids: list[str]) -> None:
        self.manager.remove(request_ids)
