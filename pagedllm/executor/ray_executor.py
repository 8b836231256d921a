"""RayExecutor: one Ray actor per rank, so that the ranks may sit on several machines.

    engine core (the Ray driver)                    RayWorker actor, rank r (any node)
    ----------------------------                    ----------------------------------
    actor.call.remote("execute", so)  --Ray-->      getattr(worker, "execute")(so)
    ray.wait / ray.get, polling       <--Ray--      the result, or its exception (RayTaskError)

Start-up, in this order:
  1. join the Ray cluster that is running (RAY_ADDRESS, or one found on this machine), or start
     a local one; only one we started is stopped by shutdown()
  2. reserve world_size bundles ({"CPU": 1}, plus {"GPU": 1} on CUDA) in a PACK placement
     group, which puts the ranks on as few machines as possible (collectives within one are
     cheaper); wait at most distributed_timeout seconds for the cluster to have them
  3. one RayWorker actor per bundle, built empty: the driver first learns where each landed
  4. the rendezvous: rank 0's node IP and a free port there (or distributed_master_port)
  5. every actor builds Worker(args, rank, init_method) at once; they meet at the rendezvous

Every call goes to every rank, as under MultiprocExecutor. Ray fails the pending call of an
actor whose process died (or whose node was lost) with RayActorError; the driver polls its
calls, so it sees that within a poll and raises WorkerDiedError, and it then releases the actors
and the bundles at once: the surviving ranks are stuck in a collective with the dead one, and
the bundles hold CPUs or GPUs that the rest of the cluster could use.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedllm.config import RAY_MISSING, EngineArgs
from pagedllm.executor.base import Executor, WorkerDiedError
from pagedllm.logger import init_logger

if TYPE_CHECKING:
    from pagedllm.core.step_io import ModelRunnerOutput, SchedulerOutput
    from pagedllm.worker.worker import KVCachePlan

logger = init_logger(__name__)

POLL_S = 0.1  # how long one ray.wait may block before the driver looks again
# After one rank's call fails, how long to wait for the others: a rank killed mid-collective
# makes its peers' calls fail too, and the death, not the peers' errors, is what to report.
DEATH_GRACE_S = 2.0


@dataclass(slots=True)
class Placement:
    """Where one actor landed: its process, its node, the GPUs Ray gave it."""

    pid: int
    node_ip: str
    node_id: str
    gpu_ids: list[str]


class RayWorker:
    """One rank's process: a Ray actor holding a Worker.

    The constructor does nothing heavy, so that the driver can ask every actor where it landed
    (to pick the rendezvous and each rank's GPUs and threads) before any of them builds its
    Worker; start() then builds it, and call() runs any of its methods."""

    def __init__(self) -> None:
        self.worker: Any = None

    def placement(self) -> Placement:
        import ray

        context = ray.get_runtime_context()
        return Placement(os.getpid(), ray.util.get_node_ip_address(), context.get_node_id(),
                         [str(gpu) for gpu in ray.get_gpu_ids()])

    def free_port(self) -> int:
        """A port free on this actor's node (rank 0's: the other ranks connect to it)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            return probe.getsockname()[1]

    def start(self, args: EngineArgs, rank: int, init_method: str | None,
              env: dict[str, str]) -> Any:
        """Build the Worker (it joins the other ranks at `init_method`); its model config.
        `env` goes in first: before torch starts its threads or touches a GPU."""
        os.environ.update(env)
        if args.world_size > 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
            # else gloo uses the address this machine's hostname resolves to, often a loopback
            # one (127.0.1.1) that the other machines cannot reach
            interface = interface_of(self.placement().node_ip)
            if interface:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        import torch

        from pagedllm.worker.worker import Worker

        if "OMP_NUM_THREADS" in env:
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        self.worker = Worker(args, rank, init_method)
        return self.worker.model_config

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


class RayExecutor(Executor):
    def __init__(self, args: EngineArgs) -> None:
        self._ray = import_ray()
        self.output_rank = args.output_rank
        self.actors: list[Any] = []  # ray.actor.ActorHandle, one per rank
        self.placements: list[Placement] = []
        self.placement_group: Any = None
        self._closed = False
        self.started_ray = join_or_start_ray(self._ray, args.world_size)
        try:
            self._start(args)
        except BaseException:
            self.shutdown()  # whatever was reserved or started goes back to the cluster
            raise

    def _start(self, args: EngineArgs) -> None:
        on_gpu = uses_gpus(self._ray, args.device)
        bundle = {"CPU": 1.0, "GPU": 1.0} if on_gpu else {"CPU": 1.0}
        self.placement_group = reserve_bundles(self._ray, bundle, args.world_size,
                                               args.distributed_timeout)
        actor_class = self._ray.remote(RayWorker)
        self.actors = [self._spawn(actor_class, rank, bundle)
                       for rank in range(args.world_size)]
        self.placements = self._gather([actor.placement.remote() for actor in self.actors])
        logger.info("ray executor: %d ranks on %s", args.world_size,
                    ", ".join(f"rank {r}: {p.node_ip}" for r, p in enumerate(self.placements)))
        init_method = self._rendezvous(args) if args.world_size > 1 else None
        envs = self._rank_envs(on_gpu)
        calls = [actor.start.remote(args, rank, init_method, envs[rank])
                 for rank, actor in enumerate(self.actors)]
        self.model_config = self._gather(calls)[0]

    def _spawn(self, actor_class: Any, rank: int, bundle: dict[str, float]) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self.placement_group,
                                                    placement_group_bundle_index=rank)
        # max_restarts=0: a rank that dies stays dead (its peers lost it mid-collective anyway)
        return actor_class.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                                   scheduling_strategy=strategy, max_restarts=0).remote()

    def _rendezvous(self, args: EngineArgs) -> str:
        """tcp:// on rank 0's node, which every rank can reach (Ray's own traffic does)."""
        port = args.distributed_master_port
        if port == 0:
            port = self._gather([self.actors[0].free_port.remote()])[0]
        host = self.placements[0].node_ip
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    def _rank_envs(self, on_gpu: bool) -> list[dict[str, str]]:
        """Each rank's environment: the driver's PAGEDLLM_* settings (a remote node's actors
        would not see them otherwise), with its GPUs or its share of its node's cores."""
        shared = {k: v for k, v in os.environ.items() if k.startswith("PAGEDLLM_")}
        if on_gpu:
            return [shared | env for env in gpu_envs(self.placements)]
        return [shared | {"OMP_NUM_THREADS": str(n)} for n in self._threads_per_rank()]

    def _threads_per_rank(self) -> list[int]:
        """Each rank's share of its node's CPUs (as Ray counts them), as share_cpu_threads
        splits one machine's among the mp executor's ranks. Ray would otherwise give each
        actor one thread (OMP_NUM_THREADS=num_cpus); the driver's OMP_NUM_THREADS wins."""
        if "OMP_NUM_THREADS" in os.environ:
            return [int(os.environ["OMP_NUM_THREADS"])] * len(self.placements)
        cpus = {node["NodeID"]: node["Resources"].get("CPU", 1) for node in self._ray.nodes()}
        ranks_on = Counter(p.node_id for p in self.placements)
        return [max(1, int(cpus.get(p.node_id, 1)) // ranks_on[p.node_id])
                for p in self.placements]

    @property
    def worker_pids(self) -> list[int]:
        """The actors' process ids, each on its own node (the same machine on a local cluster)."""
        return [p.pid for p in self.placements]

    def determine_num_blocks(self) -> KVCachePlan:
        plans = self.collective_rpc("determine_num_blocks")
        return min(plans, key=lambda plan: plan.num_blocks)  # every rank must hold them

    def initialize_cache(self, plan: KVCachePlan) -> None:
        self.collective_rpc("initialize_cache", plan)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute", scheduler_output)[self.output_rank]

    def submit(self, scheduler_output: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        """The step's calls go out now; an actor runs its calls one at a time in the order they
        came, so consecutive steps overlap across pipeline stages as under mp."""
        if self._closed:
            raise WorkerDiedError("the executor has shut down")
        refs = [actor.call.remote("execute", scheduler_output) for actor in self.actors]
        return lambda: self._gather(refs)[self.output_rank]

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        if self._closed:
            raise WorkerDiedError("the executor has shut down")
        return self._gather([actor.call.remote(method, *args) for actor in self.actors])

    def shutdown(self) -> None:
        """Kill the actors, free their bundles, stop Ray if we started it. Each part is best
        effort (Ray may already be gone, e.g. at interpreter exit), and the whole runs once."""
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.placement_group)
        if self.started_ray:
            ray.shutdown()

    # ---- waiting on the actors ------------------------------------------------------------------
    def _gather(self, refs: list[Any]) -> list[Any]:
        """The results of one call per rank, in rank order.

        Polls with ray.wait so that nothing waits forever on one rank: a dead actor's call
        fails at once (WorkerDiedError, naming the rank). A call that raised re-raises the
        worker's own exception (a ValueError stays a ValueError), once the other ranks have
        answered or DEATH_GRACE_S has passed without one of them dying (its likely cause)."""
        from ray.exceptions import RayActorError, RayTaskError

        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: list[RayTaskError] = []
        pending, give_up_at = list(refs), math.inf
        while pending and time.monotonic() < give_up_at:
            ready, pending = self._ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                try:
                    results[rank_of[ref]] = self._ray.get(ref)
                except RayActorError as exc:
                    raise self._died(rank_of[ref], exc) from exc
                except RayTaskError as exc:
                    errors.append(exc)
                    give_up_at = min(give_up_at, time.monotonic() + DEATH_GRACE_S)
        if errors:
            raise original_error(errors[0]) from errors[0]
        return [results[rank] for rank in range(len(refs))]

    def _died(self, rank: int, exc: BaseException) -> WorkerDiedError:
        where = (f"worker process {self.placements[rank].pid} (rank {rank}, on "
                 f"{self.placements[rank].node_ip})" if rank < len(self.placements)
                 else f"the Ray actor of rank {rank}")
        self.shutdown()
        return WorkerDiedError(f"{where} died ({type(exc).__name__}); the engine cannot go on")


def import_ray() -> Any:
    """The ray module, imported only here: pagedllm runs without it unless asked for it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    return ray


def original_error(exc: Any) -> BaseException:
    """The exception the worker raised, as itself (Ray wraps it in a RayTaskError that carries
    it as `cause`, when it pickled); else Ray's own error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def join_or_start_ray(ray: Any, world_size: int) -> bool:
    """Connect this process to Ray; True when it started a local cluster (which it then owns).

    Already connected (ray.init called by the user): use that. RAY_ADDRESS set: join that
    cluster, or fail. Else join one running on this machine (`ray start --head`), or start a
    local one with at least world_size CPUs: CPU ranks share the cores as the mp executor's
    processes do, and Ray's CPU counts are only for placement."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return False
    try:
        ray.init(address="auto")
        return False
    except ConnectionError:
        pass
    logger.info("ray executor: no Ray cluster found; starting a local one")
    ray.init(num_cpus=max(os.cpu_count() or 1, world_size), include_dashboard=False)
    return True


def uses_gpus(ray: Any, device: str) -> bool:
    """Whether the ranks run on CUDA: as asked, or for "auto" whether the cluster has GPUs
    (the driver's own machine may have none)."""
    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return device.startswith("cuda")


def reserve_bundles(ray: Any, bundle: dict[str, float], count: int, timeout_s: float) -> Any:
    """A ready PACK placement group of `count` copies of `bundle`, or a ValueError that says
    what was asked for and what the cluster has free."""
    from ray.util.placement_group import placement_group

    group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    if group.wait(timeout_s):
        return group
    ray.util.remove_placement_group(group)
    free, total = ray.available_resources(), ray.cluster_resources()
    have = ", ".join(f"{free.get(k, 0):g} {k} free of {total.get(k, 0):g}" for k in bundle)
    need = ", ".join(f"{v * count:g} {k}" for k, v in bundle.items())
    raise ValueError(f"the ray executor could not place {count} ranks ({count} bundles of "
                     f"{bundle}: {need}) within distributed_timeout={timeout_s:g}s; the Ray "
                     f"cluster has {have}. Add nodes (ray start --address=HEAD_IP:6379), "
                     f"free resources, or use fewer ranks")


def gpu_envs(placements: list[Placement]) -> list[dict[str, str]]:
    """CUDA_VISIBLE_DEVICES for each rank: the GPUs Ray gave the ranks of its node, in rank
    order. Ray shows each actor only its own GPU, but Worker takes cuda:rank of the GPUs it
    sees, so on one node every rank must see them all, its own at index `rank`."""
    nodes = {p.node_id for p in placements}
    if len(nodes) > 1:
        raise ValueError(f"the ray executor placed CUDA ranks on {len(nodes)} machines; Worker "
                         f"picks cuda:rank among one machine's GPUs, so CUDA ranks must fit "
                         f"on one machine for now (CPU ranks may span machines)")
    visible = ",".join(gpu for p in placements for gpu in p.gpu_ids)
    return [{"CUDA_VISIBLE_DEVICES": visible} for _ in placements]


def interface_of(ip: str) -> str | None:
    """The name of this machine's network interface that holds `ip`, if any."""
    try:
        import psutil  # Ray ships it (ray/thirdparty_files) and puts it on the path
    except ImportError:
        return None

    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address == ip for address in addresses):
            return name
    return None
