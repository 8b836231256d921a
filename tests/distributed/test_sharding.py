"""What each tensor-parallel rank builds and loads, without processes: the layers are built as
rank 1 of 2 would build them (the group faked), and their shapes and loaded slices checked
against the full checkpoint; plus the start-up errors."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))  # tiny_models.py

from tiny_models import save_tiny_model  # noqa: E402

from pagedllm import LLM  # noqa: E402
from pagedllm.config import EngineArgs  # noqa: E402
from pagedllm.distributed import parallel_state  # noqa: E402
from pagedllm.distributed.parallel_state import ParallelGroup, kv_heads_per_rank  # noqa: E402
from pagedllm.model.layers.linear import Shard  # noqa: E402
from pagedllm.model.loader import hf_folder_weights, load_model, load_model_config  # noqa: E402
from pagedllm.worker import worker as worker_module  # noqa: E402
from pagedllm.worker.kv_cache import KVCacheShape  # noqa: E402

HEAD_DIM = 16


def tiny_llama(folder: Path, kv_heads: int, tied: bool = False, vocab: int = 511) -> dict:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=64, tie_word_embeddings=tied)
    save_tiny_model(config, folder)
    return dict(hf_folder_weights(folder))


def load_as_rank(monkeypatch, folder: Path, rank: int, size: int) -> torch.nn.Module:
    monkeypatch.setattr(parallel_state, "_TP", ParallelGroup(rank, size, list(range(size))))
    config = load_model_config(str(folder), "float32")
    from pagedllm.attention import get_attention_backend

    return load_model(config, get_attention_backend("cpu"), "cpu")


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_rank_holds_its_heads_and_columns(monkeypatch, tmp_path, kv_heads):
    full = tiny_llama(tmp_path, kv_heads)
    model = load_as_rank(monkeypatch, tmp_path, rank=1, size=2)
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    prefix = "model.layers.0."
    q, k, v = attn.qkv_proj.weight.split(attn.qkv_proj.output_sizes)
    torch.testing.assert_close(q, full[prefix + "self_attn.q_proj.weight"][32:64])
    # two KV heads: rank 1 takes the second; one KV head: both ranks hold a copy of it
    kv_rows = slice(16, 32) if kv_heads == 2 else slice(0, 16)
    torch.testing.assert_close(k, full[prefix + "self_attn.k_proj.weight"][kv_rows])
    torch.testing.assert_close(v, full[prefix + "self_attn.v_proj.weight"][kv_rows])
    torch.testing.assert_close(attn.o_proj.weight, full[prefix + "self_attn.o_proj.weight"][:, 32:])
    mlp = model.model.layers[0].mlp
    gate, up = mlp.gate_up_proj.weight.split(mlp.gate_up_proj.output_sizes)
    torch.testing.assert_close(gate, full[prefix + "mlp.gate_proj.weight"][64:])
    torch.testing.assert_close(up, full[prefix + "mlp.up_proj.weight"][64:])
    torch.testing.assert_close(mlp.down_proj.weight, full[prefix + "mlp.down_proj.weight"][:, 64:])
    norm = model.model.layers[0].input_layernorm.weight  # replicated
    torch.testing.assert_close(norm, full[prefix + "input_layernorm.weight"])


def test_vocabulary_rows_split_with_padding(monkeypatch, tmp_path):
    """511 rows over 2 ranks: 256 each, rank 1's last row zero padding; lm_head likewise."""
    full = tiny_llama(tmp_path, 2, vocab=511)
    model = load_as_rank(monkeypatch, tmp_path, rank=1, size=2)
    embed = model.model.embed_tokens.weight
    assert embed.shape == (256, 64) and model.model.embed_tokens.first_id == 256
    torch.testing.assert_close(embed[:255], full["model.embed_tokens.weight"][256:])
    assert not embed[255].any()
    torch.testing.assert_close(model.lm_head.weight[:255], full["lm_head.weight"][256:])


def test_shard_take():
    rows = torch.arange(10).view(5, 2)
    assert Shard(0, 1, 2, padded=True).take(rows).tolist() == [[6, 7], [8, 9], [0, 0]]
    assert Shard(1, 1, 2).take(rows).tolist() == [[1], [3], [5], [7], [9]]
    with pytest.raises(ValueError, match="does not divide the 5 rows"):
        Shard(0, 0, 2).take(rows)


def test_kv_cache_holds_the_rank_s_heads():
    config = LlamaConfig(num_attention_heads=8, num_key_value_heads=4, hidden_size=128,
                         num_hidden_layers=2)
    assert KVCacheShape.from_config(config, 16, torch.float32, 2).num_kv_heads == 2
    assert KVCacheShape.from_config(config, 16, torch.float32, 8).num_kv_heads == 1
    with pytest.raises(ValueError, match="3 does not divide the 4 KV heads"):
        kv_heads_per_rank(4, 3)
    with pytest.raises(ValueError, match="neither a divisor nor a multiple of the model's 2"):
        kv_heads_per_rank(2, 3)


def test_heads_that_do_not_split_fail_at_start_up(tmp_path):
    tiny_llama(tmp_path, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the 4 "
                                         "attention heads"):
        LLM(str(tmp_path), dtype="float32", kv_cache_memory_bytes=16 << 20,
            tensor_parallel_size=3, skip_tokenizer_init=True)


def test_a_rendezvous_that_cannot_be_held_fails_start_up(tmp_path):
    """The rendezvous port is taken by someone else: start-up fails with torch.distributed's
    own error, in bounded time, and the other rank is stopped."""
    tiny_llama(tmp_path, 2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="address already in use"):
            LLM(str(tmp_path), dtype="float32", kv_cache_memory_bytes=16 << 20,
                tensor_parallel_size=2, skip_tokenizer_init=True, distributed_timeout=10,
                distributed_master_port=taken.getsockname()[1])
    assert time.monotonic() - started < 60


def test_more_stages_than_layers_fail_at_start_up(tmp_path):
    tiny_llama(tmp_path, 2)  # one layer
    with pytest.raises(ValueError, match="pipeline_parallel_size 2 exceeds the model's 1 layers"):
        LLM(str(tmp_path), dtype="float32", kv_cache_memory_bytes=16 << 20,
            pipeline_parallel_size=2, skip_tokenizer_init=True)


@pytest.mark.parametrize("options,match", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be at least 1"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), "need 'mp'"),
    (dict(pipeline_parallel_size=0), "pipeline_parallel_size must be at least 1"),
    (dict(tensor_parallel_size=2, enable_lora=True), "enable_lora with more than one rank"),
    (dict(pipeline_parallel_size=2, enable_lora=True), "enable_lora with more than one rank"),
    (dict(distributed_master_port=70000), "distributed_master_port"),
])
def test_bad_parallel_options(options, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**options)


def test_default_backend_follows_the_rank_count():
    assert EngineArgs().distributed_executor_backend == "uni"
    assert EngineArgs(tensor_parallel_size=2).distributed_executor_backend == "mp"


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="2 ranks need 2 GPUs; this machine has 1"):
        worker_module.rank_device("cuda", 0, 2)
    assert worker_module.rank_device("cpu", 1, 2) == "cpu"
