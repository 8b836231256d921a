"""Executors: how the engine core reaches its workers (in this process, one process per rank,
or one Ray actor per rank on any machine of a Ray cluster). The core calls the same methods
whichever it is; see base.py."""

from pagedllm.executor.base import EXECUTOR_BACKENDS, Executor, WorkerDiedError, create_executor

__all__ = ["EXECUTOR_BACKENDS", "Executor", "WorkerDiedError", "create_executor"]
