"""A stand-in for the model and its KV pools that checks the bookkeeping of core/.

Each device and host slot records the token id whose K/V it would hold. The fake model writes
the scheduled tokens into their slots and samples each request's next token from the context it
reads back through the request's block table, so a block handed to two owners, a cached block
with the wrong content, or a swap copied to the wrong place gives a different token than a run
with unlimited memory would.
"""

from __future__ import annotations

import zlib
from array import array

from pagedllm.core.step_io import ModelRunnerOutput, SchedulerOutput

EMPTY = -1


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context."""
    return zlib.crc32(array("q", context).tobytes()) % 1000


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class SlotContents:
    """What every slot of the device pool and of the host pool holds."""

    def __init__(self, num_blocks: int, num_host_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.device = [[EMPTY] * block_size for _ in range(num_blocks)]
        self.host = [[EMPTY] * block_size for _ in range(num_host_blocks)]

    def swap_out(self, copies: list[tuple[int, int]]) -> None:
        for device_id, host_id in copies:
            self.host[host_id] = list(self.device[device_id])

    def swap_in(self, copies: list[tuple[int, int]]) -> None:
        for host_id, device_id in copies:
            self.device[device_id] = list(self.host[host_id])

    def copy(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.device[dst] = list(self.device[src])

    def write(self, block_ids: list[int], start: int, token_ids: list[int]) -> None:
        bs = self.block_size
        for position, token in enumerate(token_ids, start):
            self.device[block_ids[position // bs]][position % bs] = token

    def read(self, block_ids: list[int], length: int) -> list[int]:
        bs = self.block_size
        return [self.device[block_ids[p // bs]][p % bs] for p in range(length)]


class ContentRunner:
    """Executes a SchedulerOutput the way worker/model_runner.py does, on SlotContents."""

    def __init__(self, num_blocks: int, num_host_blocks: int, block_size: int) -> None:
        self.slots = SlotContents(num_blocks, num_host_blocks, block_size)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.slots.swap_out(out.blocks_to_swap_out)
        self.slots.swap_in(out.blocks_to_swap_in)
        self.slots.copy(out.block_copies)
        # Every token's K/V is written before attention reads any (as in each model layer).
        for s in out.scheduled:
            self.slots.write(s.block_ids, s.start_position, s.token_ids)
        sampled = [s for s in out.scheduled if s.sample]
        tokens = [next_token(self.slots.read(s.block_ids, s.start_position + len(s.token_ids)))
                  for s in sampled]
        return ModelRunnerOutput([s.request_id for s in sampled], tokens)
