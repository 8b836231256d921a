"""The worker's adapters: up to `max_cpu_loras` read and packed in host memory (least recently
used evicted first), up to `max_loras` of them in the LoRA layers' slots for a step.

Each step the runner hands over its rows in batch order, each with its adapter or None
(`set_batch`). The adapters of the step get slots (one already in a slot keeps it; a new one
takes a free slot or the least recently used slot of an adapter not in this step), then every
row's slot is published to the layers through the LoRAContext. The scheduler never puts more
than max_loras adapters into a step; more here is a bug and raises.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from pagedllm.logger import init_logger
from pagedllm.lora.model import LoRAModel
from pagedllm.lora.request import LoRARequest
from pagedllm.lora.weights import PackedAdapter, load_adapter
from pagedllm.model.layers.lora import BASE, LoRABatch

logger = init_logger(__name__)


@dataclass(slots=True)
class LoRARow:
    """One request's rows of the step's flat batch."""

    request_id: str
    lora_request: LoRARequest | None
    num_tokens: int


class LoRAManager:
    def __init__(self, model: LoRAModel, max_loras: int, max_cpu_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.model = model
        self.max_cpu_loras = max_cpu_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        self.loaded: OrderedDict[int, PackedAdapter] = OrderedDict()  # least recent first
        self.slots: list[int | None] = [None] * max_loras  # adapter id in each slot
        self.slot_last_used = [0] * max_loras
        self.num_steps = 0
        self.num_loads = 0  # adapters read from disk (again, after an eviction)

    @property
    def modules(self):
        return self.model.modules

    # ---- host cache -----------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> PackedAdapter:
        """The adapter, read and packed if it is not in the host cache (ValueError if it cannot
        be); it becomes the most recently used, and the least recent beyond max_cpu_loras go."""
        adapter = self.loaded.get(request.lora_int_id)
        if adapter is None:
            adapter = load_adapter(request, self.max_rank, self.model.layers, self.modules,
                                   self.dtype)
            self.loaded[request.lora_int_id] = adapter
            self.num_loads += 1
            logger.info("LoRA adapter %r (id %d) loaded: %.1f MiB", request.lora_name,
                        request.lora_int_id, adapter.num_bytes / 2**20)
        self.loaded.move_to_end(request.lora_int_id)
        while len(self.loaded) > self.max_cpu_loras:
            evicted, _ = self.loaded.popitem(last=False)
            logger.info("LoRA adapter id %d evicted from the host cache", evicted)
        return adapter

    def remove(self, lora_int_id: int) -> None:
        self.loaded.pop(lora_int_id, None)
        for slot, held in enumerate(self.slots):
            if held == lora_int_id:
                self._fill_slot(slot, None)

    # ---- one step -------------------------------------------------------------------------------
    def set_batch(self, rows: list[LoRARow]) -> dict[str, str]:
        """Give the step's adapters slots and publish each token's slot to the layers. Returns
        request id -> why, for rows whose adapter could not be loaded (they run on the base
        model, and the runner fails them alone)."""
        self.num_steps += 1
        slot_of, failed = self._activate(rows)
        row_slots: list[int] = []
        for row in rows:
            slot = BASE
            if row.lora_request is not None:
                slot = slot_of.get(row.lora_request.lora_int_id, BASE)
            row_slots += [slot] * row.num_tokens
        self.model.context.batch = LoRABatch.from_row_slots(row_slots, self.device)
        return failed

    def clear_batch(self) -> None:
        self.model.context.batch = None

    def _activate(self, rows: list[LoRARow]) -> tuple[dict[int, int], dict[str, str]]:
        wanted: dict[int, LoRARequest] = {}
        for row in rows:
            if row.lora_request is not None:
                wanted.setdefault(row.lora_request.lora_int_id, row.lora_request)
        if len(wanted) > len(self.slots):
            raise RuntimeError(f"a step holds {len(wanted)} adapters, more than max_loras "
                               f"({len(self.slots)}): the scheduler must not allow that")
        slot_of: dict[int, int] = {}
        errors: dict[int, str] = {}
        for lora_id, request in wanted.items():
            try:
                slot_of[lora_id] = self._slot_for(request, set(wanted))
            except ValueError as exc:
                logger.error("LoRA adapter %r cannot run: %s", request.lora_name, exc)
                errors[lora_id] = f"ValueError: {exc}"
        failed = {row.request_id: errors[row.lora_request.lora_int_id] for row in rows
                  if row.lora_request is not None and row.lora_request.lora_int_id in errors}
        return slot_of, failed

    def _slot_for(self, request: LoRARequest, in_step: set[int]) -> int:
        lora_id = request.lora_int_id
        if lora_id in self.slots:
            slot = self.slots.index(lora_id)
            if lora_id in self.loaded:
                self.loaded.move_to_end(lora_id)
        else:
            adapter = self.add(request)
            slot = self._free_slot(in_step)
            self._fill_slot(slot, adapter)
        self.slot_last_used[slot] = self.num_steps
        return slot

    def _free_slot(self, in_step: set[int]) -> int:
        """An empty slot, else the least recently used one whose adapter is not in this step."""
        candidates = [s for s, held in enumerate(self.slots) if held not in in_step]
        empty = [s for s in candidates if self.slots[s] is None]
        if empty:
            return empty[0]
        return min(candidates, key=self.slot_last_used.__getitem__)

    def _fill_slot(self, slot: int, adapter: PackedAdapter | None) -> None:
        for path, layer in self.model.layers.items():
            pair = adapter.layers.get(path) if adapter is not None else None
            if pair is None:
                layer.set_slot(slot, None, None)
            else:
                layer.set_slot(slot, *pair)
        self.slots[slot] = adapter.lora_int_id if adapter is not None else None
