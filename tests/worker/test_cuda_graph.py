"""The CUDA-graph decode path's logic, on the CPU: which steps replay a graph and at what size,
how a step's inputs land in the static buffers, and (with graph replay stood in for by an eager
run of the same forward) that an engine using the graphs generates what an eager one does."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams, TokensPrompt
from pagedllm.attention import AttentionMetadata, PrefillChunk
from pagedllm.worker.cuda_graph import (
    PAD_SLOT,
    DecodeGraphInputs,
    DecodeGraphs,
    capture_sizes,
    graph_size,
)

from .helpers import MAX_POSITIONS, install_eager_graphs, sharpen, write_config_only_model


@pytest.mark.parametrize(("max_num_seqs", "max_tokens", "expected"), [
    (1, 2048, [1]),
    (3, 2048, [1, 2, 4]),
    (8, 2048, [1, 2, 4, 8]),
    (20, 2048, [1, 2, 4, 8, 16, 24]),  # the top size covers every batch a step can have
    (256, 12, [1, 2, 4, 8, 16]),  # a step has at most max_num_batched_tokens decodes
])
def test_capture_sizes_ladder(max_num_seqs, max_tokens, expected):
    assert capture_sizes(max_num_seqs, max_tokens) == expected


def test_capture_sizes_default_and_cap():
    sizes = capture_sizes(256, 2048)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))
    assert capture_sizes(4096, 8192)[-1] == 512


@pytest.mark.parametrize(("num_decodes", "num_prefills", "expected"), [
    (1, 0, 1), (3, 0, 4), (4, 0, 4), (5, 0, 8), (17, 0, 24), (24, 0, 24),
    (25, 0, None),  # above the largest graph: eager
    (3, 1, None),  # a prefill chunk in the step: eager
    (0, 2, None),
    (0, 0, None),
])
def test_graph_size_picks_the_smallest_graph_that_fits(num_decodes, num_prefills, expected):
    assert graph_size(num_decodes, num_prefills, [1, 2, 4, 8, 16, 24]) == expected


def decode_metadata(slots, seq_lens, tables, block_size=4) -> AttentionMetadata:
    long = dict(dtype=torch.long)
    return AttentionMetadata(torch.tensor(slots, **long), len(slots), torch.tensor(tables, **long),
                             torch.tensor(seq_lens, **long), [], block_size)


def test_fill_copies_the_rows_and_pads_the_rest():
    buffers = DecodeGraphInputs(max_size=8, max_model_len=30, block_size=4,
                                device=torch.device("cpu"))
    assert buffers.block_tables.shape == (8, 8)  # max_model_len / block_size, rounded up
    # an earlier step of 6 real rows leaves its data in the buffers
    wide = decode_metadata(list(range(40, 46)), [9] * 6, [[5, 6, 7]] * 6)
    buffers.fill(torch.arange(6) + 50, torch.full((6,), 8), wide, 8)
    metadata = decode_metadata([13, 22, 3], [2, 7, 4], [[3, 0], [4, 5], [0, 0]])
    buffers.fill(torch.tensor([7, 8, 9]), torch.tensor([1, 6, 3]), metadata, 4)
    assert buffers.input_ids[:3].tolist() == [7, 8, 9]
    assert buffers.positions[:3].tolist() == [1, 6, 3]
    assert buffers.slot_mapping[:3].tolist() == [13, 22, 3]
    assert buffers.seq_lens[:3].tolist() == [2, 7, 4]
    assert buffers.block_tables[:3, :2].tolist() == [[3, 0], [4, 5], [0, 0]]
    # row 3 is padding: it must write no K/V and read no context, whatever was there before
    assert buffers.slot_mapping[3].item() == PAD_SLOT
    assert buffers.seq_lens[3].item() == 0
    # rows past the graph's size are not touched (that graph does not read them)
    assert buffers.slot_mapping[4:6].tolist() == [44, 45]


def test_graph_metadata_is_views_of_the_static_buffers():
    buffers = DecodeGraphInputs(16, 64, 16, torch.device("cpu"))
    metadata = buffers.metadata(8)
    assert metadata.num_decodes == 8 and not metadata.prefills
    pairs = [(metadata.slot_mapping, buffers.slot_mapping),
             (metadata.decode_seq_lens, buffers.seq_lens),
             (metadata.decode_block_tables, buffers.block_tables)]
    for view, buffer in pairs:
        assert view.data_ptr() == buffer.data_ptr() and view.shape[0] == 8
    assert metadata.decode_block_tables.shape == (8, 4)


def test_size_for_reads_the_step_metadata():
    graphs = DecodeGraphs(model=None, kv_caches=None, sizes=[4, 1, 2], max_model_len=32,
                          block_size=4, device=torch.device("cpu"))
    assert graphs.sizes == [1, 2, 4]
    decode = decode_metadata([1, 2, 3], [1, 1, 1], [[0], [0], [0]])
    assert graphs.size_for(decode) == 4
    chunk = PrefillChunk(3, 5, 5, torch.tensor([1, 2]))
    mixed = AttentionMetadata(decode.slot_mapping, 3, decode.decode_block_tables,
                              decode.decode_seq_lens, [chunk], 4)
    assert graphs.size_for(mixed) is None


def engine(folder) -> LLM:
    return LLM(model=str(folder), load_format="dummy", dtype="float32", device="cpu",
               kv_cache_memory_bytes=4 << 20, block_size=4, max_num_seqs=16)


def test_engine_with_graph_replays_generates_what_eager_does(tmp_path):
    folder = write_config_only_model(tmp_path / "tiny")
    eager, graphed = engine(folder), engine(folder)
    for llm in (eager, graphed):
        sharpen(llm.llm_engine.worker.runner.model)
    runner = graphed.llm_engine.worker.runner
    # Sizes 1..8 with no gaps: no step is padded, so the CPU backend (which does not skip
    # padding rows) can run every replay; padding itself is tested with the Triton backend.
    graphs = DecodeGraphs(runner.model, runner.kv_caches, list(range(1, 9)), MAX_POSITIONS, 4,
                          runner.device)
    replays = install_eager_graphs(graphs, hidden_size=64)
    runner.decode_graphs = graphs
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 90 + 3 for j in range(3 + i)])
               for i in range(10)]
    params = [SamplingParams(max_tokens=2 + 2 * i, ignore_eos=True, detokenize=False, logprobs=2)
              for i in range(10)]
    expected = eager.generate(prompts, params, use_tqdm=False)
    got = graphed.generate(prompts, params, use_tqdm=False)
    for want, have in zip(expected, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(want.outputs[0].logprobs, have.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)
    # every decode-only step of at most 8 sequences replayed a graph; the rest ran eagerly
    records = graphed.llm_engine.step_records
    decode_steps = [r for r in records if set(r.scheduled.values()) == {1}]
    fitting = [r for r in decode_steps if len(r.scheduled) <= 8]
    assert fitting and len(fitting) < len(decode_steps) < len(records)
    assert sum(r.replays for r in replays) == len(fitting)
    assert {r.size for r in replays if r.replays} == {len(r.scheduled) for r in fitting}
