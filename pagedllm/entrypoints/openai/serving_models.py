"""The names the server answers to, and the 404 for any other."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import ModelCard, ModelList


@dataclass(slots=True)
class ServedModels:
    names: list[str]  # the first is the one responses report when a request names none
    root: str  # where the weights came from
    max_model_len: int

    @property
    def default(self) -> str:
        return self.names[0]

    def resolve(self, name: str | None) -> str:
        """The name to report for a request's `model` field; 404 for a model not served here."""
        if name is None or name == "":
            return self.default
        if name not in self.names:
            raise OpenAIError(404, f"the model {name!r} does not exist; this server serves "
                                   f"{', '.join(map(repr, self.names))}", "model",
                              "model_not_found")
        return name

    def model_list(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=self.root,
                                         max_model_len=self.max_model_len)
                               for name in self.names])
