"""--generation-config: sampling defaults from a model's generation_config.json, for the
fields a request leaves unset, so that a request that sets nothing samples the way the model's
authors intended (vLLM's behaviour since 0.8).

auto: the model folder's generation_config.json (a GGUF file has none: no defaults);
vllm: no defaults (OpenAI's: temperature 1, top_p 1, ...); a path: that folder's file, or
that file. max_new_tokens is not taken: max_tokens defaults come from --max-tokens-default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# generation_config.json keys that are request fields of the same name
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
FILE_NAME = "generation_config.json"


def generation_config_file(option: str, model_path: Path) -> Path | None:
    if option == "vllm":
        return None
    if option == "auto":
        return model_path / FILE_NAME if model_path.is_dir() else None
    path = Path(option).expanduser()
    path = path / FILE_NAME if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--generation-config {option!r}: no {FILE_NAME} there (give auto, "
                         "vllm, or a folder or file holding one)")
    return path


def load_sampling_defaults(option: str, model_path: Path) -> dict[str, Any]:
    """The sampling defaults the option selects (empty: none); ValueError for a bad file."""
    path = generation_config_file(option, model_path)
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    defaults = {key: config[key] for key in SAMPLING_KEYS if config.get(key) is not None}
    for key, value in defaults.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: {key} must be a number, got {value!r}")
    if "top_k" in defaults and not isinstance(defaults["top_k"], int):
        raise ValueError(f"{path}: top_k must be an integer, got {defaults['top_k']!r}")
    return defaults
