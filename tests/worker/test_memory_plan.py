"""The GPU memory plan's arithmetic, and the dummy batches its profile runs (valid batches: they
run on the CPU backend here)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention import get_attention_backend
from pagedllm.model.loader import load_model, load_model_config
from pagedllm.worker.kv_cache import KVCacheShape, allocate_kv_caches
from pagedllm.worker.memory_plan import (
    GRAPH_OVERHEAD_BYTES,
    GiB,
    GpuMemoryPlan,
    decode_profile_batch,
    graph_memory_estimate,
    prefill_profile_batch,
    run_dummy_step,
)

from .helpers import write_config_only_model


def test_kv_cache_gets_the_share_left_after_everything_else():
    plan = GpuMemoryPlan(total=80 * GiB, utilization=0.9, in_use=3 * GiB, weights=2 * GiB,
                         activations=GiB, cuda_graphs=GiB // 2)
    assert plan.share == 72 * GiB
    assert plan.kv_cache == 72 * GiB - 3 * GiB - GiB - GiB // 2
    text = plan.describe()
    for piece in ("80.00 GiB x 0.9", "72.00 GiB", "weights 2.00", "other in use 1.00",
                  "activations 1.00", "CUDA graphs 0.50", "KV cache 67.50 GiB"):
        assert piece in text


def test_kv_cache_is_never_negative():
    plan = GpuMemoryPlan(total=10 * GiB, utilization=0.5, in_use=4 * GiB, weights=4 * GiB,
                         activations=2 * GiB, cuda_graphs=0)
    assert plan.kv_cache == 0


def test_graph_estimate():
    assert graph_memory_estimate(123, 0) == 0
    assert graph_memory_estimate(100 << 20, 35) == (100 << 20) + 35 * GRAPH_OVERHEAD_BYTES


def test_prefill_profile_batch_cuts_chunks_at_max_model_len():
    batch = prefill_profile_batch(num_tokens=40, max_model_len=16, block_size=4, device="cpu")
    chunks = batch.metadata.prefills
    assert [(c.query_start, c.query_len, c.context_len) for c in chunks] == [
        (0, 16, 16), (16, 16, 16), (32, 8, 8)]
    assert [c.block_table.tolist() for c in chunks] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batch.num_blocks == 10
    assert batch.positions.tolist() == [*range(16), *range(16), *range(8)]
    slots = batch.metadata.slot_mapping.tolist()
    assert len(set(slots)) == 40 and max(slots) < batch.num_blocks * 4
    # each token's slot is in its own chunk's table, at its position
    for chunk in chunks:
        for i in range(chunk.query_len):
            slot = slots[chunk.query_start + i]
            assert chunk.block_table[i // 4].item() * 4 + i % 4 == slot
    assert batch.metadata.num_decodes == 0 and batch.input_ids.shape == (40,)


def test_decode_profile_batch_has_graph_wide_tables():
    batch = decode_profile_batch(batch_size=10, block_size=4, max_blocks=8, device="cpu")
    md = batch.metadata
    assert md.num_decodes == 10 and not md.prefills
    assert md.decode_block_tables.shape == (10, 8)
    assert md.decode_block_tables[:, 0].tolist() == [i // 4 for i in range(10)]
    assert md.decode_seq_lens.tolist() == [1] * 10
    assert batch.num_blocks == 3 and md.slot_mapping.tolist() == list(range(10))


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_dummy_steps_run_on_a_real_backend(tmp_path, kind):
    folder = write_config_only_model(tmp_path / "tiny")
    config = load_model_config(str(folder), "float32")
    model = load_model(config, get_attention_backend("cpu"), "cpu", "dummy")
    shape = KVCacheShape.from_config(config.hf_config, 4, torch.float32)
    batch = (prefill_profile_batch(100, 64, 4, "cpu") if kind == "prefill"
             else decode_profile_batch(12, 4, 16, "cpu"))
    kv_caches = allocate_kv_caches(shape, batch.num_blocks, "cpu")
    hidden = run_dummy_step(model, batch, kv_caches, num_logit_rows=8)
    assert hidden.shape == (batch.input_ids.shape[0], 64)
    assert torch.isfinite(hidden).all()
