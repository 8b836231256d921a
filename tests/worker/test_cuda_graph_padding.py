"""A padded decode-graph step through the Triton backend gives the real rows exactly what an
unpadded eager step gives, and its padding rows write nothing into the KV cache.

Graph replay is stood in for by an eager run of the same forward on the static buffers (see
helpers.EagerReplay), so this runs without a GPU: Triton's interpreter runs the kernels on CPU
tensors (TRITON_INTERPRET=1, set before triton_ops is imported). With a GPU it runs compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from pagedllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedllm.core.step_io import ScheduledRequest  # noqa: E402
from pagedllm.model.loader import load_model, load_model_config  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402
from pagedllm.worker.cuda_graph import DecodeGraphs  # noqa: E402
from pagedllm.worker.kv_cache import KVCacheShape, allocate_kv_caches  # noqa: E402
from pagedllm.worker.model_runner import ModelRunner  # noqa: E402

from .helpers import (  # noqa: E402
    MAX_POSITIONS,
    VOCAB_SIZE,
    install_eager_graphs,
    sharpen,
    write_config_only_model,
)

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
BLOCK_SIZE = 4


def request(rid: str, tokens: list[int], start: int, blocks: list[int]) -> ScheduledRequest:
    prompt = list(range(3, 3 + start + len(tokens)))
    return ScheduledRequest(rid, tokens, start, blocks, SamplingParams(), [], prompt, True, [rid])


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ModelRunner:
    folder = write_config_only_model(tmp_path_factory.mktemp("tiny"))
    config = load_model_config(str(folder), "float32", None, None, DEVICE)
    model = sharpen(load_model(config, TritonAttentionBackend(), DEVICE, "dummy"))
    shape = KVCacheShape.from_config(config.hf_config, BLOCK_SIZE, torch.float32)
    kv_caches = allocate_kv_caches(shape, 32, DEVICE)
    runner = ModelRunner(model, kv_caches, BLOCK_SIZE, DEVICE, 0, VOCAB_SIZE)
    # seven sequences of 5 to 11 prompt tokens, three blocks each
    prefills = [request(f"s{i}", list(range(10, 15 + i)), 0, [3 * i, 3 * i + 1, 3 * i + 2])
                for i in range(7)]
    runner.forward(runner.prepare_inputs(prefills))
    return runner


def decodes(indices: list[int]) -> list[ScheduledRequest]:
    return [request(f"s{i}", [20 + i], 5 + i, [3 * i, 3 * i + 1, 3 * i + 2]) for i in indices]


def snapshot(kv_caches) -> list[torch.Tensor]:
    return [t.clone() for pair in kv_caches for t in pair]


def restore(kv_caches, saved: list[torch.Tensor]) -> None:
    for target, source in zip((t for pair in kv_caches for t in pair), saved):
        target.copy_(source)


def test_padded_graph_step_equals_eager_and_padding_writes_nothing(runner):
    graphs = DecodeGraphs(runner.model, runner.kv_caches, [1, 2, 4, 8], MAX_POSITIONS,
                          BLOCK_SIZE, torch.device(DEVICE))
    install_eager_graphs(graphs, hidden_size=64)
    before = snapshot(runner.kv_caches)
    # an earlier step of four real rows leaves data in row 3 of the size-4 buffers
    first = runner.prepare_inputs(decodes([3, 4, 5, 6]))
    assert graphs.size_for(first.metadata) == 4
    graphs.run(first.input_ids, first.positions, first.metadata, 4)
    restore(runner.kv_caches, before)

    step = runner.prepare_inputs(decodes([0, 1, 2]))
    eager = runner.model(step.input_ids, step.positions, runner.kv_caches, step.metadata)
    after_eager = snapshot(runner.kv_caches)
    restore(runner.kv_caches, before)
    assert graphs.size_for(step.metadata) == 4
    hidden = graphs.run(step.input_ids, step.positions, step.metadata, 4)
    assert hidden.shape == eager.shape == (3, 64)
    assert torch.isfinite(graphs.outputs[4]).all()  # the padding row too
    torch.testing.assert_close(hidden, eager, rtol=1e-5, atol=1e-5)
    # The real rows wrote what the eager step wrote (up to rounding: a batch of 4 rows is
    # multiplied in another order than one of 3), and nothing else changed: in particular the
    # stale row 3, whose slot belongs to sequence 6, wrote nothing.
    real = torch.zeros(32 * BLOCK_SIZE, dtype=torch.bool)
    real[step.metadata.slot_mapping.cpu()] = True
    for have, want, old in zip(snapshot(runner.kv_caches), after_eager, before):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
        have, old = have.flatten(0, 1).cpu(), old.flatten(0, 1).cpu()
        assert torch.equal(have[~real], old[~real])
        assert not torch.equal(have[real], old[real])
    restore(runner.kv_caches, before)
