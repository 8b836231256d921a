"""The names the server answers to (its model, and each LoRA adapter it serves), the 404 for
any other, and loading or unloading adapters at run time (--allow-runtime-lora-updating)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import (
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from pagedllm.lora.request import LoRARequest


@dataclass(slots=True)
class ServedModels:
    names: list[str]  # the first is the one responses report when a request names none
    root: str  # where the weights came from
    max_model_len: int
    loras: dict[str, LoRARequest] = field(default_factory=dict)  # adapter name -> adapter
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def default(self) -> str:
        return self.names[0]

    def resolve(self, name: str | None) -> str:
        """The name to report for a request's `model` field; 404 for a model not served here."""
        if name is None or name == "":
            return self.default
        if name not in self.names and name not in self.loras:
            served = [*self.names, *self.loras]
            raise OpenAIError(404, f"the model {name!r} does not exist; this server serves "
                                   f"{', '.join(map(repr, served))}", "model",
                              "model_not_found")
        return name

    def lora_request(self, name: str) -> LoRARequest | None:
        """The adapter a resolved model name selects; None for the base model."""
        return self.loras.get(name)

    def new_lora(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        """An adapter under a fresh id (ids are never reused: KV blocks are keyed on them)."""
        if name in self.names or name in self.loras:
            raise OpenAIError.bad_request(f"the LoRA adapter {name!r} has already been loaded",
                                          "lora_name")
        return LoRARequest(name, next(self._ids), path, base_model_name or self.default)

    def model_list(self) -> ModelList:
        cards = [ModelCard(id=name, root=self.root, max_model_len=self.max_model_len)
                 for name in self.names]
        cards += [ModelCard(id=name, root=lora.lora_path, parent=lora.base_model_name,
                            max_model_len=self.max_model_len) for name, lora in self.loras.items()]
        return ModelList(data=cards)

    def card(self, name: str) -> ModelCard:
        """GET /v1/models/{name}: the served model or adapter; 404 otherwise."""
        resolved = self.resolve(name)
        return next(card for card in self.model_list().data if card.id == resolved)

    # ---- run-time loading (the engine checks the adapter) --------------------------------------
    async def load(self, engine, body: LoadLoRAAdapterRequest) -> str:
        lora = self.new_lora(body.lora_name, body.lora_path)
        try:
            await engine.add_lora(lora)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc), "lora_path") from exc
        self.loras[lora.lora_name] = lora
        return f"Success: LoRA adapter '{lora.lora_name}' added successfully."

    async def unload(self, engine, body: UnloadLoRAAdapterRequest) -> str:
        lora = self.loras.get(body.lora_name)
        if lora is None or body.lora_int_id not in (None, lora.lora_int_id):
            raise OpenAIError(404, f"the LoRA adapter {body.lora_name!r} cannot be found",
                              "lora_name", "model_not_found")
        await engine.remove_lora(lora.lora_int_id)
        del self.loras[lora.lora_name]
        return f"Success: LoRA adapter '{lora.lora_name}' removed successfully."
