"""The one seam through which per-step features plug into EngineCore.step.

    EngineCore.step()
        outputs = [f.before_schedule() for f in features]     e.g. grammars that failed to compile
        scheduler_output = scheduler.schedule()
        f.on_scheduled(scheduler_output)                        e.g. attach the grammar bitmask
        runner_output = executor.execute(scheduler_output)
        outputs += scheduler.update_from_output(...)
        outputs = f.after_update(outputs)                       e.g. a grammar ends its request;
                                                                beams fork, are dropped, finish
    and, outside the step:
        f.on_add(request)          a request arrives (may raise ValueError: nothing was queued)
        f.on_finished(ids)         requests ended (finished, stopped by the front-end, aborted)

A feature changes the scheduler only through its public calls (finish_requests, fork,
replace_last_token, set_waiting_for_grammar); it never sets attributes on the runner. Whatever the
worker must know travels in the SchedulerOutput. Structured outputs and beam search use this
seam (structured_output/step.py, engine/beam_search.py). Speculative decoding needs no hook:
its drafts are proposed in the worker and travel through the scheduler's own records
(Request.spec_token_ids, ScheduledRequest.spec_token_ids, ModelRunnerOutput.draft_token_ids),
and a verify is one more chunk under the scheduler's one rule (see core/scheduler.py).
"""

from __future__ import annotations

from pagedllm.core.request import Request
from pagedllm.core.step_io import EngineCoreOutput, SchedulerOutput


class StepFeature:
    """Every hook is optional; the defaults do nothing."""

    def on_add(self, request: Request) -> None:
        pass

    def before_schedule(self) -> list[EngineCoreOutput]:
        return []

    def on_scheduled(self, scheduler_output: SchedulerOutput) -> None:
        pass

    def after_update(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        return outputs

    def on_finished(self, request_ids: list[str]) -> None:
        pass
