"""The executor interface between the engine core and its workers.

    executor.model_config              what rank 0 loaded (the core sizes its queues on it)
    executor.determine_num_blocks()    KVCachePlan: the fewest blocks any rank can hold
    executor.initialize_cache(plan)    every rank allocates that many
    executor.execute(scheduler_output) every rank runs the step; the sampling rank's result
                                       comes back
    executor.submit(scheduler_output)  the same without waiting: a call that waits, later
    executor.collective_rpc(method)    any other Worker method on every rank (stats, tests)

An executor never blocks forever on a worker: a worker that dies makes the call raise
WorkerDiedError at once, and the engine stops taking requests.

The modules that build workers are imported only when an executor is created: engine/ reaches
the device only through this interface, never by importing worker/ or model/ itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pagedllm.config import EXECUTOR_BACKENDS, EngineArgs

if TYPE_CHECKING:
    from pagedllm.core.step_io import ModelRunnerOutput, SchedulerOutput
    from pagedllm.worker.worker import KVCachePlan


class WorkerDiedError(RuntimeError):
    """A worker process exited (or stopped answering) while the engine still needed it."""


class Executor(ABC):
    model_config: Any  # model.loader.ModelConfig of rank 0

    @abstractmethod
    def determine_num_blocks(self) -> KVCachePlan: ...

    @abstractmethod
    def initialize_cache(self, plan: KVCachePlan) -> None: ...

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def submit(self, scheduler_output: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        """Start a step and return a call that waits for its result. Steps submitted one after
        another run in that order on every rank, and their results must be waited for in the
        same order (pipeline stages overlap consecutive steps). Here: run it now."""
        result = self.execute(scheduler_output)
        return lambda: result

    @abstractmethod
    def shutdown(self) -> None: ...

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call a Worker method on every rank; each rank's result, in rank order."""

    @property
    def worker(self) -> Any:
        """The worker object itself, where it lives in this process (tests and profiling)."""
        raise AttributeError(f"{type(self).__name__} runs its workers in other processes")


def create_executor(args: EngineArgs) -> Executor:
    backend = args.distributed_executor_backend
    if backend == "uni":
        from pagedllm.executor.uniproc import UniProcExecutor

        return UniProcExecutor(args)
    if backend == "mp":
        from pagedllm.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(args)
    if backend == "ray":
        from pagedllm.executor.ray_executor import RayExecutor

        return RayExecutor(args)
    raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                     f"got {backend!r}")
