"""Adapter folders the engine refuses, each with a ValueError naming the problem, and files it
never reads (outside the adapter folder); the engine keeps serving other requests."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from lora_models import ATTENTION, lora, save_adapter, save_base
from tiny_models import tiny_engine

from pagedllm import SamplingParams, TokensPrompt
from pagedllm.config import EngineArgs
from pagedllm.lora.peft import check_adapter
from pagedllm.lora.registry import LoRARegistry
from pagedllm.lora.request import LoRARequest

# the tiny Llama's modules: hidden 64, 4 heads and 2 KV heads of 16, intermediate 128
MODULES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
           "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(base folder, an adapter folder of rank 8 on the attention projections)."""
    root = tmp_path_factory.mktemp("lora-checks")
    save_base("llama", root / "base")
    save_adapter(root / "base", root / "good", 8, 16, ATTENTION, seed=3)
    return root / "base", root / "good"


def edited(good, tmp_path, **changes):
    """A copy of the good adapter with adapter_config.json changed."""
    folder = tmp_path / "edited"
    shutil.copytree(good, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def refused(folder, match, max_rank=16, modules=MODULES):
    with pytest.raises(ValueError, match=match):
        check_adapter(str(folder), max_rank, modules)


def test_the_good_adapter_passes(good):
    config = check_adapter(str(good[1]), 16, MODULES)
    assert (config.rank, config.alpha, config.scaling) == (8, 16.0, 2.0)


def test_missing_path_and_non_adapters(good, tmp_path):
    refused(tmp_path / "nowhere", "does not exist")
    (tmp_path / "file.txt").write_text("x")
    refused(tmp_path / "file.txt", "is not a folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "not a PEFT adapter: it has no adapter_config.json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(good[1] / "adapter_config.json", no_weights)
    refused(no_weights, "neither adapter_model.safetensors nor adapter_model.bin")
    refused(edited(good[1], tmp_path, peft_type="IA3"), "IA3 adapter")


def test_rank_above_max_lora_rank(good):
    refused(good[1], r"rank 8, above max_lora_rank \(4\)", max_rank=4)


@pytest.mark.parametrize("changes, match", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "trains biases"),
    ({"rank_pattern": {"q_proj": 4}}, "per-module ranks"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embedding and lm_head adapters"),
    ({"target_modules": ["q_proj", "fc1"]}, "targets modules this model lacks: fc1"),
    ({"r": 0}, "positive integer"),
])
def test_unsupported_settings_are_refused(good, tmp_path, changes, match):
    refused(edited(good[1], tmp_path, **changes), match)


def test_weights_of_another_model_are_refused(good):
    wider = {name: (2 * i, 2 * o) for name, (i, o) in MODULES.items()}
    refused(good[1], "has shape .* but this model needs", modules=wider)


def test_links_out_of_the_folder_are_never_followed(good, tmp_path):
    """A weights file or config that is a symlink to a file outside the folder is refused
    before anything is read from it."""
    outside = tmp_path / "secret.safetensors"
    shutil.copy(good[1] / "adapter_model.safetensors", outside)
    folder = tmp_path / "linked"
    shutil.copytree(good[1], folder)
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(outside, folder / "adapter_model.safetensors")
    refused(folder, "points outside the adapter folder")
    config_link = tmp_path / "config-link"
    shutil.copytree(good[1], config_link)
    (config_link / "adapter_config.json").unlink()
    os.symlink("../secret.json", config_link / "adapter_config.json")
    (tmp_path / "secret.json").write_text("{}")
    refused(config_link, "points outside the adapter folder")


def test_lora_request_and_registry_checks(good):
    with pytest.raises(ValueError, match="lora_int_id must be an integer of at least 1"):
        LoRARequest("x", 0, "/p")
    with pytest.raises(ValueError, match="lora_name must be a non-empty string"):
        LoRARequest("", 1, "/p")
    registry = LoRARegistry(True, 16, MODULES)
    registry.check(LoRARequest("a", 1, str(good[1])))
    with pytest.raises(ValueError, match="already names the adapter"):
        registry.check(LoRARequest("b", 1, "/elsewhere"))
    with pytest.raises(ValueError, match="already used by lora_int_id 1"):
        registry.check(LoRARequest("a", 2, str(good[1])))
    registry.remove(1)  # an unloaded id may come back only with its old folder
    with pytest.raises(ValueError, match="already names the adapter"):
        registry.check(LoRARequest("c", 1, "/elsewhere"))
    with pytest.raises(ValueError, match="started without LoRA"):
        LoRARegistry(False, 16, MODULES).check(LoRARequest("a", 1, str(good[1])))


def test_engine_args_lora_options():
    with pytest.raises(ValueError, match="max_loras set, but LoRA is off"):
        EngineArgs(max_loras=4)
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be at least max_loras"):
        EngineArgs(enable_lora=True, max_loras=2, max_cpu_loras=1)
    with pytest.raises(ValueError, match="max_lora_rank must be at least 1"):
        EngineArgs(enable_lora=True, max_lora_rank=0)
    assert EngineArgs(enable_lora=True, max_loras=3).max_cpu_loras == 3


def test_the_engine_refuses_bad_adapters_and_keeps_serving(good, tmp_path):
    base, folder = good
    llm = tiny_engine(base, enable_lora=True, max_lora_rank=4)
    prompt = [TokensPrompt(prompt_token_ids=[1, 2, 3])]
    params = SamplingParams(max_tokens=2, detokenize=False)
    with pytest.raises(ValueError, match="above max_lora_rank"):
        llm.generate(prompt, params, use_tqdm=False, lora_request=lora("big", 1, folder))
    with pytest.raises(ValueError, match="does not exist"):
        llm.generate(prompt, params, use_tqdm=False, lora_request=lora("x", 2, tmp_path / "no"))
    with pytest.raises(ValueError, match="got 2 LoRA requests for 1 prompts"):
        llm.generate(prompt, params, use_tqdm=False, lora_request=[None, None])
    assert len(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids) == 2
    plain = tiny_engine(base)
    with pytest.raises(ValueError, match="started without LoRA"):
        plain.generate(prompt, params, use_tqdm=False, lora_request=lora("x", 3, folder))
