"""The adapters an engine's front-end has accepted: each id names one adapter folder for the
engine's life (block hashes and the worker's caches are keyed on the id), each name one id."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.lora.peft import AdapterConfig, ModuleShapes, check_adapter
from pagedllm.lora.request import LoRARequest


@dataclass(slots=True)
class LoRARegistry:
    enabled: bool
    max_lora_rank: int
    modules: ModuleShapes  # what the model's LoRA layers take (filled by the worker)
    adapters: dict[int, LoRARequest] = field(default_factory=dict)  # loaded now
    configs: dict[int, AdapterConfig] = field(default_factory=dict)
    # every id ever accepted: an unloaded id may come back only with its old folder, since
    # cached KV blocks (and the worker's copy of the weights) still carry it
    seen: dict[int, LoRARequest] = field(default_factory=dict)

    def check(self, lora_request: LoRARequest | None) -> None:
        """ValueError unless `lora_request` (None: the base model) can run on this engine; an
        adapter seen for the first time is read and checked (peft.check_adapter), then
        remembered under its id."""
        if lora_request is None:
            return
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got "
                             f"{type(lora_request).__name__}")
        if not self.enabled:
            raise ValueError("this engine was started without LoRA: pass enable_lora=True "
                             "(--enable-lora) to run requests under an adapter")
        known = self.seen.get(lora_request.lora_int_id)
        if known is not None:
            self._check_same(known, lora_request)
            if lora_request.lora_int_id in self.adapters:
                return
        self._check_name_free(lora_request)
        self.configs[lora_request.lora_int_id] = check_adapter(
            lora_request.lora_path, self.max_lora_rank, self.modules)
        self.adapters[lora_request.lora_int_id] = lora_request
        self.seen[lora_request.lora_int_id] = lora_request

    @staticmethod
    def _check_same(known: LoRARequest, new: LoRARequest) -> None:
        if (known.lora_name, known.lora_path) != (new.lora_name, new.lora_path):
            raise ValueError(f"lora_int_id {new.lora_int_id} already names the adapter "
                             f"{known.lora_name!r} at {known.lora_path!r}; give "
                             f"{new.lora_name!r} at {new.lora_path!r} an id of its own")

    def _check_name_free(self, new: LoRARequest) -> None:
        for other in self.adapters.values():
            if other.lora_name == new.lora_name:
                raise ValueError(f"the LoRA name {new.lora_name!r} is already used by "
                                 f"lora_int_id {other.lora_int_id}")

    def remove(self, lora_int_id: int) -> LoRARequest | None:
        self.configs.pop(lora_int_id, None)
        return self.adapters.pop(lora_int_id, None)

    def by_name(self, name: str) -> LoRARequest | None:
        return next((a for a in self.adapters.values() if a.lora_name == name), None)
