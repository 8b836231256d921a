"""Which rank this process is, its groups, and the collectives the model layers call.

    world of tp_size * pp_size ranks, one process each; global rank = stage * tp_size + tp_rank

        stage 0:  ranks 0 .. tp-1        (tensor-parallel group 0)
        stage 1:  ranks tp .. 2tp-1      ...

    a pipeline group: one tensor-parallel rank across the stages (ranks t, tp + t, 2tp + t, ...);
    activations go from each stage to the next along it

A process that never calls `init_distributed` (one device, the uni executor) sees groups of one
rank, on which every collective returns its input untouched: the model code is the same either
way, and costs nothing extra without parallelism.

The collectives are torch.distributed's: gloo on the CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pagedllm.logger import init_logger

logger = init_logger(__name__)


@dataclass
class ParallelGroup:
    """One communication group as this rank sees it."""

    rank: int = 0  # this process's index within the group
    size: int = 1
    ranks: list[int] = field(default_factory=lambda: [0])  # the global ranks, in group order
    group: dist.ProcessGroup | None = None
    # time this rank spent in the group's collectives, and how many (benchmarks read them)
    collective_seconds: float = 0.0
    collective_calls: int = 0

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the group, in place (where sums of row-parallel partial products meet)."""
        if self.size > 1:
            started = time.perf_counter()
            dist.all_reduce(tensor, group=self.group)
            self._count(started)
        return tensor

    def _count(self, started: float) -> None:
        self.collective_seconds += time.perf_counter() - started
        self.collective_calls += 1

    def gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Every rank's tensor concatenated along `dim` in rank order, on the group's first
        rank; None elsewhere."""
        if self.size == 1:
            return tensor
        started = time.perf_counter()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.is_first else None
        dist.gather(tensor, parts, dst=self.ranks[0], group=self.group)
        self._count(started)
        return torch.cat(parts, dim=dim) if self.is_first else None

    # ---- pipeline stages: the group of one tensor-parallel rank across the stages -------------
    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def send_next(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Hand this stage's activations to the same tensor-parallel rank of the next stage."""
        started = time.perf_counter()
        for tensor in tensors:
            dist.send(tensor.contiguous(), dst=self.ranks[self.rank + 1])
        self._count(started)

    def recv_previous(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Fill `tensors` (empty, of the shapes the previous stage sends) from it."""
        started = time.perf_counter()
        for tensor in tensors:
            dist.recv(tensor, src=self.ranks[self.rank - 1])
        self._count(started)
        return tensors


_TP = ParallelGroup()
_PP = ParallelGroup()


def tp_group() -> ParallelGroup:
    """This process's tensor-parallel group (one rank when not distributed)."""
    return _TP


def pp_group() -> ParallelGroup:
    """This process's pipeline group: its rank is the stage (one stage when not distributed)."""
    return _PP


def divide(total: int, parts: int, what: str) -> int:
    """total / parts, where anything else is a clear error naming `what`."""
    if total % parts:
        raise ValueError(f"tensor_parallel_size {parts} does not divide the {total} {what}")
    return total // parts


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: its share, or one replicated head when there are fewer KV heads
    than ranks (each then serves tp_size / num_kv_heads ranks' query heads)."""
    if num_kv_heads >= tp_size:
        return divide(num_kv_heads, tp_size, "KV heads")
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp_size} is neither a divisor nor a multiple of "
                         f"the model's {num_kv_heads} KV heads")
    return 1


def kv_head_shard(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(index, parts): this rank's KV heads are chunk `index` of `parts` equal chunks."""
    if num_kv_heads >= tp_size:
        return tp_rank, tp_size
    return tp_rank // (tp_size // num_kv_heads), num_kv_heads


def init_distributed(rank: int, tp_size: int, pp_size: int, init_method: str, device: str,
                     timeout_s: float) -> None:
    """Join the world (every rank calls this, each with its own rank) and build the groups. A
    rank that does not join within `timeout_s` makes everyone's call fail."""
    global _TP, _PP
    world_size = tp_size * pp_size
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s))
    stage, tp_rank = divmod(rank, tp_size)
    for s in range(pp_size):  # every rank creates every group, in the same order
        ranks = list(range(s * tp_size, (s + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if s == stage:
            _TP = ParallelGroup(tp_rank, tp_size, ranks, group)
    # stages talk point to point (send/recv on the default group): no group of their own needed
    _PP = ParallelGroup(stage, pp_size, [stage_rank * tp_size + tp_rank
                                         for stage_rank in range(pp_size)])
    logger.info("rank %d of %d joined (%s): pipeline stage %d of %d, tensor-parallel rank %d "
                "of %d", rank, world_size, backend, stage, pp_size, tp_rank, tp_size)
