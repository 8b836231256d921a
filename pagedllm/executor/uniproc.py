"""UniProcExecutor: one worker in the engine core's own process, called directly."""

from __future__ import annotations

from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.core.step_io import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.base import Executor
from pagedllm.worker.worker import KVCachePlan, Worker


class UniProcExecutor(Executor):
    def __init__(self, args: EngineArgs) -> None:
        self._worker = Worker(args)
        self.model_config = self._worker.model_config

    @property
    def worker(self) -> Worker:
        return self._worker

    def determine_num_blocks(self) -> KVCachePlan:
        return self._worker.determine_num_blocks()

    def initialize_cache(self, plan: KVCachePlan) -> None:
        self._worker.initialize_cache(plan)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._worker.execute(scheduler_output)

    def shutdown(self) -> None:
        pass

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self._worker, method)(*args)]
