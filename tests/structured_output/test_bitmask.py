"""The bitmask layout, and xgrammar's CPU kernel against the plain-torch path (no model)."""

from __future__ import annotations

import torch

from pagedllm.structured_output.bitmask import (
    allocate_bitmask,
    apply_bitmask,
    apply_bitmask_torch,
    bitmask_width,
)

VOCAB = 100  # not a multiple of 32: the last word is partly padding


def only(tokens_per_row: list[list[int]]) -> torch.Tensor:
    """A bitmask allowing exactly the given tokens in each row."""
    bitmask = torch.zeros(len(tokens_per_row), bitmask_width(VOCAB), dtype=torch.int32)
    for row, tokens in enumerate(tokens_per_row):
        for token in tokens:
            word, bit = divmod(token, 32)
            # bit 31 makes the int32 word negative: the sign must not leak into other bits
            value = int(bitmask[row, word]) | (1 << bit)
            bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value
    return bitmask


def test_bit_j_of_word_i_is_token_32i_plus_j():
    allowed = [[0, 31, 32, 63, 99], [5], [31]]
    for apply in (apply_bitmask, apply_bitmask_torch):
        logits = torch.zeros(3, VOCAB)
        apply(logits, only(allowed), [0, 1, 2], VOCAB)
        finite = [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]
        assert finite == allowed, apply.__name__


def test_only_the_listed_rows_are_masked_and_both_paths_agree():
    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, bitmask_width(VOCAB)), dtype=torch.int32,
                            generator=generator)
    logits = torch.randn(6, VOCAB, generator=generator)
    rows = [1, 4, 5]
    native, plain = logits.clone(), logits.clone()
    apply_bitmask(native, bitmask, rows, VOCAB)
    apply_bitmask_torch(plain, bitmask, rows, VOCAB)
    assert torch.equal(native, plain)
    untouched = [0, 2, 3]
    assert torch.equal(native[untouched], logits[untouched])
    assert torch.isinf(native[rows]).any()


def test_a_fresh_bitmask_allows_everything():
    logits = torch.randn(2, VOCAB)
    masked = logits.clone()
    apply_bitmask(masked, allocate_bitmask(2, VOCAB), [0, 1], VOCAB)
    assert torch.equal(masked, logits)
