"""A PEFT LoRA adapter folder, read and checked without torch (the front-end checks an adapter
before any request runs under it; the worker reads its tensors later, through weights.py).

    folder/adapter_config.json           r, lora_alpha, use_rslora, target_modules, ...
    folder/adapter_model.safetensors     base_model.model.<module>.lora_A.weight  [r, in]
      (or adapter_model.bin)             base_model.model.<module>.lora_B.weight  [out, r]

The delta of a targeted module is  scaling * B @ A @ x,  scaling = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora. What the engine cannot run (DoRA, biases, modules_to_save,
embedding or lm_head adapters, per-module rank or alpha patterns) is a ValueError naming it,
never a silently different model.

Only the two files above are read, and only if they lie inside the folder once every symlink is
resolved: a link or a name pointing elsewhere is refused.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."
# settings whose presence changes the model in a way these layers do not implement
REFUSED_SETTINGS = {
    "use_dora": "DoRA adapters (use_dora)",
    "lora_bias": "adapters with a LoRA bias (lora_bias)",
    "modules_to_save": "adapters with fully trained modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "target_parameters": "adapters on parameters (target_parameters)",
}
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
MAX_HEADER_BYTES = 100 << 20  # a safetensors header past this is not an adapter's

ModuleShapes = dict[str, tuple[int, int]]  # a module name (q_proj, ...) -> (in, out) features


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    folder: str  # the adapter folder, every symlink resolved
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | None  # None: a pattern; the weights file decides
    weights_file: str  # adapter_model.safetensors or .bin inside `folder`

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass(frozen=True, slots=True)
class WeightName:
    """One tensor of the weights file: which module, which module name, A or B."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    leaf: str  # e.g. q_proj
    matrix: str  # "A" or "B"


def adapter_folder(lora_path: str) -> Path:
    """The folder, resolved; ValueError if it does not exist or is not a directory."""
    folder = Path(lora_path).expanduser()
    if not folder.exists():
        raise ValueError(f"the LoRA adapter path {lora_path!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"the LoRA adapter path {lora_path!r} is not a folder (a PEFT adapter "
                         f"is a folder with {CONFIG_FILE})")
    return folder.resolve()


def inside_file(folder: Path, name: str) -> Path | None:
    """`folder/name` if it is a regular file that stays inside `folder` after resolving every
    symlink, None if it is absent; ValueError if it points outside."""
    candidate = folder / name
    if not candidate.exists() and not candidate.is_symlink():
        return None
    resolved = candidate.resolve()
    if not resolved.is_relative_to(folder):
        raise ValueError(f"the adapter file {name} in {str(folder)!r} points outside the "
                         f"adapter folder; refusing to read it")
    if not resolved.is_file():
        raise ValueError(f"the adapter file {name} in {str(folder)!r} is not a regular file")
    return resolved


def read_adapter_config(lora_path: str, max_lora_rank: int) -> AdapterConfig:
    """Read and check adapter_config.json, and find the weights file (ValueError naming the
    problem: missing folder or files, not a LoRA adapter, a setting the engine cannot run, a
    rank above max_lora_rank)."""
    folder = adapter_folder(lora_path)
    config_path = inside_file(folder, CONFIG_FILE)
    if config_path is None:
        raise ValueError(f"{lora_path!r} is not a PEFT adapter: it has no {CONFIG_FILE}")
    raw = _read_json(config_path)
    weights = next((p for n in WEIGHT_FILES if (p := inside_file(folder, n)) is not None), None)
    if weights is None:
        raise ValueError(f"{lora_path!r} is not a PEFT adapter: it has neither "
                         f"{' nor '.join(WEIGHT_FILES)}")
    _check_settings(raw, lora_path)
    rank = _positive_int(raw.get("r"), "r", lora_path)
    if rank > max_lora_rank:
        raise ValueError(f"the LoRA adapter {lora_path!r} has rank {rank}, above max_lora_rank "
                         f"({max_lora_rank}); start the engine with max_lora_rank >= {rank}")
    alpha = raw.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"lora_alpha of {lora_path!r} must be a number, got {alpha!r}")
    return AdapterConfig(str(folder), rank, float(alpha), bool(raw.get("use_rslora", False)),
                         _target_modules(raw.get("target_modules"), lora_path), str(weights))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path.name} of {str(path.parent)!r}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path.name} of {str(path.parent)!r} is not a JSON object")
    return raw


def _check_settings(raw: dict[str, Any], lora_path: str) -> None:
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{lora_path!r} is a {peft_type} adapter; only LoRA adapters are "
                         f"supported")
    for key, what in REFUSED_SETTINGS.items():
        if raw.get(key):
            raise ValueError(f"the LoRA adapter {lora_path!r} uses {what}, which pagedllm does "
                             f"not support")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"the LoRA adapter {lora_path!r} trains biases (bias="
                         f"{raw['bias']!r}), which pagedllm does not support; only bias='none'")
    if raw.get("fan_in_fan_out"):
        raise ValueError(f"the LoRA adapter {lora_path!r} has fan_in_fan_out=True (GPT-2 style "
                         f"Conv1D layers), which pagedllm does not support")


def _positive_int(value: Any, name: str, lora_path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} of the LoRA adapter {lora_path!r} must be a positive integer, "
                         f"got {value!r}")
    return value


def _target_modules(value: Any, lora_path: str) -> tuple[str, ...] | None:
    if isinstance(value, str):  # a regular expression or "all-linear": the weights decide
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"target_modules of the LoRA adapter {lora_path!r} must be a list of "
                         f"module names or a pattern, got {value!r}")
    return tuple(sorted(set(value)))


def check_target_modules(names: tuple[str, ...] | set[str], modules: ModuleShapes,
                         lora_path: str) -> None:
    """ValueError for a module name the model has no LoRA layer for."""
    embeddings = sorted(n for n in names if n in EMBEDDING_MODULES)
    if embeddings:
        raise ValueError(f"the LoRA adapter {lora_path!r} targets {', '.join(embeddings)}: "
                         f"embedding and lm_head adapters are not supported")
    missing = sorted(set(names) - set(modules))
    if missing:
        raise ValueError(f"the LoRA adapter {lora_path!r} targets modules this model lacks: "
                         f"{', '.join(missing)} (it has {', '.join(sorted(modules))})")


def parse_weight_name(key: str, lora_path: str) -> WeightName:
    """`base_model.model.<module>.lora_A.weight` -> its module, module name and matrix;
    ValueError for any other tensor (embedding adapters, DoRA magnitudes, biases, ...)."""
    if key.startswith(KEY_PREFIX):
        key = key[len(KEY_PREFIX):]
    for matrix in ("A", "B"):
        suffix = f".lora_{matrix}.weight"
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return WeightName(module, module.rsplit(".", 1)[-1], matrix)
    what = ("an embedding adapter" if "lora_embedding" in key else
            "a DoRA magnitude" if "magnitude" in key else "a tensor that is not a LoRA A or B")
    raise ValueError(f"the LoRA adapter {lora_path!r} holds {key!r}, {what}, which pagedllm "
                     f"does not support")


def check_weight_shapes(config: AdapterConfig, shapes: dict[str, tuple[int, ...]],
                        modules: ModuleShapes) -> None:
    """Every tensor is a LoRA A [r, in] or B [out, r] of a module the model has, in pairs."""
    names = {key: parse_weight_name(key, config.folder) for key in shapes}
    check_target_modules({n.leaf for n in names.values()}, modules, config.folder)
    for key, name in names.items():
        in_features, out_features = modules[name.leaf]
        expected = ((config.rank, in_features) if name.matrix == "A" else
                    (out_features, config.rank))
        if tuple(shapes[key]) != expected:
            raise ValueError(f"{key} of the LoRA adapter {config.folder!r} has shape "
                             f"{list(shapes[key])}, but this model needs {list(expected)} "
                             f"(rank {config.rank}): is it an adapter for another model?")
    pairs: dict[str, set[str]] = {}
    for name in names.values():
        pairs.setdefault(name.module, set()).add(name.matrix)
    unpaired = sorted(m for m, found in pairs.items() if found != {"A", "B"})
    if unpaired:
        raise ValueError(f"the LoRA adapter {config.folder!r} lacks the A or B matrix of "
                         f"{', '.join(unpaired[:4])}")
    if not names:
        raise ValueError(f"the LoRA adapter {config.folder!r} holds no LoRA weights")


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (no tensor is read)."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError("header too large")
            header = json.loads(file.read(length))
        return {key: tuple(value["shape"]) for key, value in header.items()
                if key != "__metadata__"}
    except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path!r} is not a readable safetensors file: {exc}") from exc


def check_adapter(lora_path: str, max_lora_rank: int, modules: ModuleShapes) -> AdapterConfig:
    """Everything that can be checked before the tensors load: the config, the targets and,
    for a safetensors file, every tensor's name and shape (a .bin file's tensors are checked
    when the worker loads them)."""
    config = read_adapter_config(lora_path, max_lora_rank)
    if config.target_modules is not None:
        check_target_modules(config.target_modules, modules, lora_path)
    if config.weights_file.endswith(".safetensors"):
        check_weight_shapes(config, safetensors_shapes(config.weights_file), modules)
    return config
