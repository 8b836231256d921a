"""Turns a SchedulerOutput into one flat batch, runs the model on it, and samples.

The batch has no padding: every scheduled token is one row. Decodes go first (one row each),
then each prefill chunk as a run of rows; see attention/backend.py for the layout. Logits are
computed only for the last row of each request whose chunk reaches its end. (A decode-only step
replayed as a CUDA graph is padded inside worker/cuda_graph.py; only its real rows come back.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pagedllm.attention import AttentionMetadata, PrefillChunk
from pagedllm.core.step_io import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from pagedllm.distributed.parallel_state import pp_group
from pagedllm.lora.manager import LoRAManager, LoRARow
from pagedllm.model.layers.sampler import Penalties, Sampler, SamplingBatch
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.config import MAX_SPECULATIVE_TOKENS
from pagedllm.spec_decode.proposer import ProposalInputs, Proposer, may_speculate
from pagedllm.spec_decode.verify import verify
from pagedllm.utils import cdiv
from pagedllm.worker.cuda_graph import DecodeGraphs
from pagedllm.worker.draft_runner import DraftRunner
from pagedllm.worker.swap import SwapSpace


@dataclass
class PromptLogprobRows:
    """Rows of the flat batch whose next token is a known prompt token."""

    request_id: str
    first_row: int  # in the flat batch
    first_position: int  # the position of that row in the request
    targets: list[int]  # the prompt token that follows each row
    num_logprobs: int


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampling: list[ScheduledRequest]  # the request behind each logits row
    sample_ids: list[str]  # who receives each row's token (forked siblings share a row's logits)
    prompt_logprob_rows: list[PromptLogprobRows]
    # request id -> why its LoRA adapter could not run (its rows ran on the base model)
    lora_failed: dict[str, str] = dataclasses.field(default_factory=dict)
    # speculative decoding: rows with drafts to verify; their len(drafts) + 1 logits rows each
    # follow the sampling rows' in logits_indices
    spec_rows: list[ScheduledRequest] = dataclasses.field(default_factory=list)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches, block_size: int, device: str,
                 seed: int, vocab_size: int, swap_space: SwapSpace | None = None,
                 lora: LoRAManager | None = None, samples: bool = True,
                 proposer: Proposer | None = None, draft: DraftRunner | None = None) -> None:
        """`samples`: False on every rank but the one that samples (the first tensor-parallel
        rank of the last pipeline stage): the others run every forward pass, and on the last
        stage every logits projection, with it but sample nothing."""
        self.model = model
        self.samples = samples
        self.lora = lora  # enable_lora: sets each step's adapter slots for the LoRA layers
        self.swap_space = swap_space  # host pool for preempted requests (preemption_mode=swap)
        self.vocab_size = vocab_size
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.sampler = Sampler(seed, self.device)
        self.generators: dict[str, torch.Generator] = {}  # per seeded request, across steps
        self.decode_graphs: DecodeGraphs | None = None  # set by capture_decode_graphs (CUDA)
        self.proposer = proposer  # speculative decoding: drafts for each sequence's next step
        self.draft = draft  # speculative decoding with a draft model (instead of `proposer`)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            self.generators.pop(request_id, None)
        if self.draft is not None:
            self.draft.forget(scheduler_output.finished_request_ids)
        self.swap_blocks(scheduler_output)
        self.copy_blocks(scheduler_output.block_copies)
        if not scheduler_output.scheduled:
            return ModelRunnerOutput([], [])
        inputs = self.prepare_inputs(scheduler_output.scheduled)
        hidden = self.forward(inputs)
        if hidden is None:  # a pipeline stage before the last: its activations went on
            return ModelRunnerOutput([], [])
        if self.draft is not None:  # the draft's K/V for every token the target computed
            self.draft.sync(inputs.input_ids, inputs.positions, inputs.metadata)
        if not self.samples:
            return self._project_logits_only(hidden, inputs)
        prompt_logprobs = {r.request_id: (r.first_position, self._prompt_logprobs(hidden, r))
                           for r in inputs.prompt_logprob_rows}
        if not inputs.sampling and not inputs.spec_rows:
            return ModelRunnerOutput([], [], prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        num_plain = len(inputs.sample_ids)
        output = self._sample(logits[:num_plain], inputs, scheduler_output)
        output.prompt_logprobs = prompt_logprobs
        if inputs.spec_rows:
            self._verify(logits[num_plain:], inputs, output)
        output.draft_token_ids = self._propose(inputs, output)
        return output

    def _sample(self, logits: torch.Tensor, inputs: ModelInputs,
                scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One token for each sampling row (every row but those verifying drafts)."""
        if not inputs.sampling:
            return ModelRunnerOutput([], [], [])
        if scheduler_output.grammar is not None:  # structured outputs: mask in place
            scheduler_output.grammar.apply(logits, inputs.sample_ids, self.vocab_size)
        failed, banned = self._isolate_bad_rows(inputs)
        failed |= {sample_id: inputs.lora_failed[s.request_id]
                   for s, sample_id in zip(inputs.sampling, inputs.sample_ids)
                   if s.request_id in inputs.lora_failed}
        batch = self.sampling_batch(inputs.sampling, inputs.sample_ids, banned)
        token_ids, logprobs = self.sampler(logits, batch)
        return ModelRunnerOutput(list(inputs.sample_ids), token_ids,
                                 logprobs or [None] * len(token_ids), failed=failed)

    def _verify(self, logits: torch.Tensor, inputs: ModelInputs,
                output: ModelRunnerOutput) -> None:
        """Accept each row's longest valid run of drafts plus one token (spec_decode/verify.py)
        and add them to `output`: the last token as the row's sampled one, the run before it
        as its accepted drafts."""
        rows = inputs.spec_rows
        expanded = [s for s in rows for _ in range(len(s.spec_token_ids) + 1)]
        batch = self.sampling_batch(expanded)
        draft_probs = ([self.draft.take_probs(s.request_id, len(s.spec_token_ids))
                        for s in rows] if self.draft is not None else None)
        result = verify(self.sampler, logits, batch, [s.spec_token_ids for s in rows],
                        draft_probs)
        for s, accepted, final, logprobs in zip(rows, result.accepted, result.final,
                                                result.logprobs):
            output.request_ids.append(s.request_id)
            output.sampled_token_ids.append(final)
            output.logprobs.append(logprobs[-1])
            output.accepted_token_ids[s.request_id] = accepted
            output.accepted_logprobs[s.request_id] = logprobs[:-1]
            if s.request_id in inputs.lora_failed:  # its adapter did not run: fail it too
                output.failed[s.request_id] = inputs.lora_failed[s.request_id]

    def _propose(self, inputs: ModelInputs, output: ModelRunnerOutput) -> dict[str, list[int]]:
        """Drafts for the next step of each sequence that got tokens and may speculate."""
        if self.proposer is None and self.draft is None:
            return {}
        rows = {sample_id: s for s, sample_id in zip(inputs.sampling, inputs.sample_ids)}
        rows |= {s.request_id: s for s in inputs.spec_rows}
        ids, contexts, newest = [], [], []
        for sample_id, token_id in zip(output.request_ids, output.sampled_token_ids):
            s = rows[sample_id]
            accepted = output.accepted_token_ids.get(sample_id, [])
            new = [*accepted, token_id]
            if sample_id in output.failed or not may_speculate(
                    s.sampling_params, len(s.output_token_ids) + len(new)):
                continue
            ids.append(sample_id)
            if self.draft is not None:  # the newest token goes at the first position not run
                position = (s.start_position + len(s.token_ids) - len(s.spec_token_ids)
                            + len(accepted))
                newest.append((s, sample_id, token_id, position))
            else:
                contexts.append(ProposalInputs(s.prompt_token_ids + s.output_token_ids + new,
                                               MAX_SPECULATIVE_TOKENS))
        if self.draft is not None:
            return self.draft.propose(self, newest) if newest else {}
        drafts = self.proposer.propose(contexts) if contexts else []
        return {sample_id: d for sample_id, d in zip(ids, drafts) if d}

    def _isolate_bad_rows(self, inputs: ModelInputs) -> tuple[dict[str, str], list[list[int]]]:
        """Set up each row's sampling on its own first (seeded generator, banned tokens, the
        ranges tensors can hold): a row whose own parameters raise is failed alone (sample id ->
        why) and sampled greedily as a placeholder, so the rest of the batch goes on. Returns
        the failures and each row's banned tokens (computed once, here)."""
        failed, banned = {}, []
        for row, (s, sample_id) in enumerate(zip(inputs.sampling, inputs.sample_ids)):
            try:
                _check_row(s)
                self._generator(s, sample_id)
                banned.append(banned_tokens(s))
            except Exception as exc:
                banned.append([])
                failed[sample_id] = f"{type(exc).__name__}: {exc}"
                inputs.sampling[row] = dataclasses.replace(
                    s, request_id="", sampling_params=PLACEHOLDER_PARAMS, output_token_ids=[],
                    prompt_token_ids=[])
                self.generators.pop(sample_id, None)
        return failed, banned

    def forward(self, inputs: ModelInputs) -> torch.Tensor | None:
        """The final hidden states: a decode-only step that fits a captured CUDA graph replays
        it (padded to the graph's size); every other step runs the model eagerly. None on a
        pipeline stage before the last."""
        graphs = self.decode_graphs
        size = graphs.size_for(inputs.metadata) if graphs is not None else None
        if size is not None:
            return graphs.run(inputs.input_ids, inputs.positions, inputs.metadata, size)
        pp = pp_group()
        if pp.size == 1:
            return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        # pipeline stages: the previous stage's activations in, this stage's layers, then on
        # to the next stage (every stage built the same batch from the same scheduler output)
        intermediate = None if pp.is_first else pp.recv_previous(self.model.intermediate_buffers(
            inputs.input_ids.shape[0], self.model.activation_dtype, self.device))
        out = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata,
                         intermediate)
        if pp.is_last:
            return out
        pp.send_next(out)
        return None

    def capture_decode_graphs(self, sizes: list[int], max_model_len: int) -> float:
        """Capture the decode forward at every batch size of `sizes` (once, at start-up, after
        the KV cache exists); returns the seconds it took."""
        graphs = DecodeGraphs(self.model, self.kv_caches, sizes, max_model_len, self.block_size,
                              self.device)
        seconds = graphs.capture()
        self.decode_graphs = graphs
        return seconds

    def _project_logits_only(self, hidden: torch.Tensor, inputs: ModelInputs) -> ModelRunnerOutput:
        """A non-sampling rank's share of the step: the same logits projections, in the same
        order, as the sampling rank makes (each is a collective that gathers there)."""
        for rows in inputs.prompt_logprob_rows:
            for first, targets in prompt_logprob_slices(rows):
                self.model.compute_logits(hidden[first : first + len(targets)])
        if inputs.sampling:
            self.model.compute_logits(hidden[inputs.logits_indices])
        return ModelRunnerOutput([], [])

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: PromptLogprobRows):
        """A chunk's prompt logprobs, a slice of positions at a time."""
        result = []
        for first, targets in prompt_logprob_slices(rows):
            logits = self.model.compute_logits(hidden[first : first + len(targets)])
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            ids = torch.tensor(targets, device=logprobs.device)
            result += Sampler.gather_logprobs(logprobs, ids, [rows.num_logprobs] * len(targets))
        return result

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> ModelInputs:
        decodes = [s for s in scheduled if s.is_decode]
        prefills = [s for s in scheduled if not s.is_decode]  # batch_order: decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        chunks: list[PrefillChunk] = []
        prompt_rows: list[PromptLogprobRows] = []
        bs = self.block_size
        spec_indices: list[int] = []
        for s in decodes + prefills:
            start, count = s.start_position, len(s.token_ids)
            if count > 1:
                table = s.block_ids[: cdiv(start + count, bs)]
                chunks.append(PrefillChunk(len(input_ids), count, start + count,
                                           self._tensor(table)))
            wanted = s.sampling_params.prompt_logprobs
            targets = s.prompt_token_ids[start + 1 : start + count + 1]
            if wanted is not None and targets:
                prompt_rows.append(PromptLogprobRows(s.request_id, len(input_ids), start, targets,
                                                     wanted))
            input_ids.extend(s.token_ids)
            span = range(start, start + count)
            positions.extend(span)
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in span)
            if s.spec_token_ids:  # every position from the last real token on samples
                spec_indices.extend(range(len(input_ids) - len(s.spec_token_ids) - 1,
                                          len(input_ids)))
            else:
                logits_indices.extend([len(input_ids) - 1] * len(s.sample_ids))
        metadata = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decodes=len(decodes),
            decode_block_tables=self._decode_block_tables(decodes),
            decode_seq_lens=self._tensor([s.start_position + 1 for s in decodes]),
            prefills=chunks,
            block_size=bs,
        )
        plain = [s for s in decodes + prefills if not s.spec_token_ids]
        sampling = [s for s in plain for _ in s.sample_ids]
        sample_ids = [sample_id for s in plain for sample_id in s.sample_ids]
        lora_failed = self._set_lora_batch(decodes + prefills)
        return ModelInputs(self._tensor(input_ids), self._tensor(positions), metadata,
                           self._tensor(logits_indices + spec_indices), sampling, sample_ids,
                           prompt_rows, lora_failed,
                           [s for s in decodes + prefills if s.spec_token_ids])

    def _set_lora_batch(self, rows: list[ScheduledRequest]) -> dict[str, str]:
        """The LoRA layers' slot for every row, in batch order (enable_lora)."""
        if self.lora is None:
            return {}
        return self.lora.set_batch([LoRARow(s.request_id, s.lora_request, len(s.token_ids))
                                    for s in rows])

    def swap_blocks(self, scheduler_output: SchedulerOutput) -> None:
        """Out before in: a device block freed by a swap-out may be the target of a swap-in
        (or of a copy-on-write copy, which comes after both)."""
        if scheduler_output.blocks_to_swap_out or scheduler_output.blocks_to_swap_in:
            self.swap_space.swap_out(scheduler_output.blocks_to_swap_out)
            self.swap_space.swap_in(scheduler_output.blocks_to_swap_in)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks, in every layer's K and V pools at once."""
        if not copies:
            return
        src = self._tensor([c[0] for c in copies])
        dst = self._tensor([c[1] for c in copies])
        draft_caches = self.draft.kv_caches if self.draft is not None else []
        for key_cache, value_cache in [*self.kv_caches, *draft_caches]:
            key_cache[dst] = key_cache[src]
            value_cache[dst] = value_cache[src]

    def _decode_block_tables(self, decodes: list[ScheduledRequest]) -> torch.Tensor:
        lengths = [cdiv(s.start_position + 1, self.block_size) for s in decodes]
        width = max(lengths, default=0)
        rows = [s.block_ids[:n] + [0] * (width - n) for s, n in zip(decodes, lengths)]
        return self._tensor(rows).view(len(decodes), width)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def sampling_batch(self, rows: list[ScheduledRequest], sample_ids: list[str] | None = None,
                       banned: list[list[int]] | None = None) -> SamplingBatch:
        sample_ids = sample_ids or [s.request_id for s in rows]
        params = [s.sampling_params for s in rows]
        floats = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        return SamplingBatch(
            temperature=floats([0.0 if p.greedy else p.temperature for p in params]),
            top_k=self._tensor([p.top_k for p in params]),
            top_p=floats([p.top_p for p in params]),
            min_p=floats([p.min_p for p in params]),
            generators=[self._generator(s, sample_id) for s, sample_id in zip(rows, sample_ids)],
            banned=banned if banned is not None else [banned_tokens(s) for s in rows],
            num_logprobs=[p.num_sample_logprobs for p in params],
            all_greedy=all(p.greedy for p in params),
            needs_top_k_or_p=any(p.top_k > 0 or p.top_p < 1 for p in params),
            needs_min_p=any(p.min_p > 0 for p in params),
            allowed=([p.allowed_token_ids for p in params]
                     if any(p.allowed_token_ids for p in params) else None),
            logit_bias=_flat_logit_bias(params),
            penalties=self._penalties(rows) if any(p.has_penalties for p in params) else None,
        )

    def _penalties(self, rows: list[ScheduledRequest]) -> Penalties:
        params = [s.sampling_params for s in rows]
        floats = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        return Penalties(
            presence=floats([p.presence_penalty for p in params]),
            frequency=floats([p.frequency_penalty for p in params]),
            repetition=floats([p.repetition_penalty for p in params]),
            output_counts=self._token_counts([s.output_token_ids for s in rows]),
            prompt_mask=self._token_counts([s.prompt_token_ids for s in rows]) > 0,
        )

    def _token_counts(self, token_lists: list[list[int]]) -> torch.Tensor:
        """[rows, vocab] occurrence counts, by one scatter over a padded index matrix."""
        width = max((len(t) for t in token_lists), default=0)
        pad = self.vocab_size  # an extra column that is dropped at the end
        index = self._tensor([t + [pad] * (width - len(t)) for t in token_lists])
        index = index.view(len(token_lists), width)
        counts = torch.zeros(len(token_lists), self.vocab_size + 1, device=self.device)
        counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
        return counts[:, : self.vocab_size]

    def _generator(self, s: ScheduledRequest, sample_id: str) -> torch.Generator | None:
        seed = s.sampling_params.seed
        if seed is None or s.sampling_params.greedy:
            return None
        generator = self.generators.get(sample_id)
        if generator is None:
            # forked siblings draw from seed + their index, so they differ yet are reproducible
            sibling = s.sample_ids.index(sample_id) if sample_id in s.sample_ids else 0
            generator = torch.Generator(device=self.device)
            generator.manual_seed(_wrap_seed(seed + sibling))
            self.generators[sample_id] = generator
        return generator


def batch_order(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """The rows in the flat batch's order (prepare_inputs): every decode, then every prefill
    chunk."""
    return ([s for s in scheduled if s.is_decode]
            + [s for s in scheduled if not s.is_decode])


INT64 = (-(2**63), 2**63 - 1)
PLACEHOLDER_PARAMS = SamplingParams(temperature=0)  # what a failed row samples with
PROMPT_LOGPROBS_SLICE = 256  # prompt positions whose logits are computed at once


def prompt_logprob_slices(rows: PromptLogprobRows) -> list[tuple[int, list[int]]]:
    """(first row, target tokens) of each PROMPT_LOGPROBS_SLICE positions of a chunk: a whole
    2048-token chunk at once would hold two [2048, vocab] fp32 tensors (0.8 GB for a 49k
    vocabulary) where a slice holds 50 MB."""
    return [(rows.first_row + start, rows.targets[start : start + PROMPT_LOGPROBS_SLICE])
            for start in range(0, len(rows.targets), PROMPT_LOGPROBS_SLICE)]


def _wrap_seed(seed: int) -> int:
    """A sibling's seed past 2**64 - 1 (seed + its index) wraps around, as a uint64 would."""
    return seed - 2**64 if seed >= 2**64 else seed


def _check_row(s: ScheduledRequest) -> None:
    """The values this row puts into the batch's int64 tensors must fit them (a seed is checked
    by creating the row's generator)."""
    top_k = s.sampling_params.top_k
    if not INT64[0] <= top_k <= INT64[1]:
        raise ValueError(f"top_k {top_k} does not fit in 64 bits")


def banned_tokens(s: ScheduledRequest) -> list[int]:
    """Tokens a row may not sample now: stop tokens before min_tokens, and the last token of any
    bad word whose other tokens the sequence has just produced."""
    params = s.sampling_params
    banned = params.tokens_banned_before_min() if len(s.output_token_ids) < params.min_tokens else []
    for word in params.bad_words_token_ids:
        prefix = word[:-1]
        if not prefix or _ends_with(s.prompt_token_ids, s.output_token_ids, prefix):
            banned.append(word[-1])
    return banned


def _ends_with(prompt: list[int], output: list[int], tail: list[int]) -> bool:
    n = len(tail)
    recent = output[-n:] if len(output) >= n else prompt[len(prompt) - (n - len(output)):] + output
    return recent == tail


def _flat_logit_bias(params) -> tuple[list[int], list[int], list[float]] | None:
    rows, ids, values = [], [], []
    for row, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            rows.append(row)
            ids.append(token_id)
            values.append(bias)
    return (rows, ids, values) if rows else None
