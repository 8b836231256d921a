"""CUDA graphs for decode steps: the model's forward captured once per batch size, then replayed.

A decode step at small batch launches hundreds of short kernels whose launch cost, not their
work, sets the step time. Replaying a captured graph launches them all at once. A graph fixes
its tensors' addresses and shapes, so the inputs live in static buffers sized for the largest
captured batch, and a batch of n decodes runs the graph of the smallest captured size >= n:

    rows:            0 .. n-1 (real)     n .. size-1 (padding)
    input_ids        the new tokens      stale ids (any valid id does)
    positions        their positions     stale positions (valid, < max_model_len)
    slot_mapping     their slots         -1: the backend writes no K/V for it
    decode_seq_lens  their lengths       0: the backend reads no context for it
    block_tables     [n, max_blocks]     stale rows, never read (seq_len 0)

The block tables are always max_model_len / block_size wide; a row's columns past its length
are never read. Only the forward up to the final hidden states is captured: logits, masks and
sampling stay eager (their shapes depend on who samples), and so does every step that carries a
prefill chunk or more decodes than the largest graph.

The graphs share one memory pool and are captured largest first, so the smaller ones fit into
the memory the largest one's intermediates left (vLLM does the same). A graph's output is read
before any other graph is replayed, which is what makes sharing the pool safe.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import time

import torch

from pagedllm.attention import AttentionMetadata
from pagedllm.utils import cdiv

MAX_CAPTURE_SIZE = 512
PAD_SLOT = -1  # padded rows' slot: the Triton write_kv (graphs run only on CUDA) skips it


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int,
                  max_size: int = MAX_CAPTURE_SIZE) -> list[int]:
    """The ladder 1, 2, 4, 8, 16, 24, ... (multiples of 8), up to the first size that holds
    the largest decode batch a step can have; with n decodes, at most 7 rows are padding."""
    largest = min(max_num_seqs, max_num_batched_tokens, max_size)
    sizes = []
    for size in itertools.chain((1, 2, 4), itertools.count(8, 8)):
        sizes.append(size)
        if size >= largest:
            return sizes
    raise AssertionError("unreachable")


def graph_size(num_decodes: int, num_prefills: int, sizes: list[int]) -> int | None:
    """The captured batch size a step runs at, or None for an eager step (a prefill chunk in
    the batch, nothing to run, or more decodes than the largest graph)."""
    if num_prefills or not num_decodes:
        return None
    index = bisect.bisect_left(sizes, num_decodes)
    return sizes[index] if index < len(sizes) else None


class DecodeGraphInputs:
    """The static input buffers of the decode graphs, and the copy of a step's inputs into them.
    Device-agnostic (it is tested on the CPU); only DecodeGraphs captures and replays."""

    def __init__(self, max_size: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.max_blocks = cdiv(max_model_len, block_size)
        longs = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_size, **longs)
        self.positions = torch.zeros(max_size, **longs)
        self.slot_mapping = torch.full((max_size,), PAD_SLOT, **longs)
        self.seq_lens = torch.zeros(max_size, **longs)
        self.block_tables = torch.zeros(max_size, self.max_blocks, **longs)

    def metadata(self, size: int) -> AttentionMetadata:
        """The attention metadata of a graph of `size` rows: views of the static buffers."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            num_decodes=size,
            decode_block_tables=self.block_tables[:size],
            decode_seq_lens=self.seq_lens[:size],
            prefills=[],
            block_size=self.block_size,
        )

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor,
             metadata: AttentionMetadata, size: int) -> None:
        """Copy a decode-only step's n rows in and mark rows n..size-1 as padding."""
        n = metadata.num_decodes
        width = metadata.decode_block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.seq_lens[:n].copy_(metadata.decode_seq_lens)
        self.block_tables[:n, :width].copy_(metadata.decode_block_tables)
        if n < size:
            self.slot_mapping[n:size].fill_(PAD_SLOT)
            self.seq_lens[n:size].zero_()

    def fill_for_capture(self, size: int) -> None:
        """Inputs for warm-up and capture: every row a 1-token sequence in block 0 that writes
        nothing, so that the KV cache is left as it was."""
        self.input_ids[:size].zero_()
        self.positions[:size].zero_()
        self.slot_mapping[:size].fill_(PAD_SLOT)
        self.seq_lens[:size].fill_(1)
        self.block_tables[:size].zero_()


class DecodeGraphs:
    """One captured forward per size of the ladder (CUDA only)."""

    def __init__(self, model: torch.nn.Module, kv_caches, sizes: list[int], max_model_len: int,
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes)
        self.inputs = DecodeGraphInputs(self.sizes[-1], max_model_len, block_size, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def size_for(self, metadata: AttentionMetadata) -> int | None:
        return graph_size(metadata.num_decodes, len(metadata.prefills), self.sizes)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata, size: int) -> torch.Tensor:
        """The hidden states of the step's n rows. The tensor is a view into the graph's
        output: read it before the next replay."""
        self.inputs.fill(input_ids, positions, metadata, size)
        self.graphs[size].replay()
        return self.outputs[size][: metadata.num_decodes]

    @torch.inference_mode()
    def capture(self) -> float:
        """Warm up and capture every size, largest first; returns the seconds it took."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        gc.collect()
        gc.freeze()  # torch.cuda.graph collects garbage before each capture; this makes it quick
        try:
            for size in reversed(self.sizes):
                self._capture_one(size, pool)
        finally:
            gc.unfreeze()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def _capture_one(self, size: int, pool) -> None:
        metadata = self.inputs.metadata(size)
        self.inputs.fill_for_capture(size)
        # Eager first: Triton compiles (and cuBLAS picks its kernels for) this shape outside
        # the capture, where compiling and allocating workspaces are not allowed.
        self._forward(metadata, size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = self._forward(metadata, size)
        self.graphs[size] = graph
        self.outputs[size] = output

    def _forward(self, metadata: AttentionMetadata, size: int) -> torch.Tensor:
        return self.model(self.inputs.input_ids[:size], self.inputs.positions[:size],
                          self.kv_caches, metadata)
