"""Executors: how the engine core reaches its workers (in this process, or one process per
rank). The core calls the same four methods either way; see base.py."""

from pagedllm.executor.base import EXECUTOR_BACKENDS, Executor, WorkerDiedError, create_executor

__all__ = ["EXECUTOR_BACKENDS", "Executor", "WorkerDiedError", "create_executor"]
