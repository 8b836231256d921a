"""The engine's per-token logprobs (dict of token id -> Logprob) in OpenAI's two formats."""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import (
    ChatLogprobEntry,
    ChatLogprobs,
    ChatTopLogprob,
    CompletionLogprobs,
)
from pagedllm.outputs import Logprob

TokenLogprobs = dict[int, Logprob]


def token_text(token_id: int, logprob: Logprob) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else f"token_id:{token_id}"


def top_entries(entry: TokenLogprobs, n: int) -> list[tuple[int, Logprob]]:
    """The n most likely tokens at this position, best first.

    The engine's dict holds the sampled token (with its true rank) and the top-k by rank; the
    sampled one is listed once even when it is also among the top-k.
    """
    ranked = sorted((item for item in entry.items() if item[1].rank is not None),
                    key=lambda item: item[1].rank)
    return [item for item in ranked if item[1].rank <= n][:n]


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobs | None], n: int,
                        text_offset: int, tokenizer=None) -> tuple[CompletionLogprobs, int]:
    """/v1/completions format; returns it and the text offset after these tokens.

    An entry may be None: the prompt's first token has no logprob (nothing comes before it);
    its text then comes from the tokenizer.
    """
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            text = tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"
            chosen, top = None, None
        else:
            logprob = entry[token_id]
            text, chosen = token_text(token_id, logprob), logprob.logprob
            top = {token_text(t, lp): lp.logprob for t, lp in top_entries(entry, n)}
            top.setdefault(text, chosen)  # OpenAI lists the chosen token too
        result.tokens.append(text)
        result.token_logprobs.append(chosen)
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result, text_offset


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobs], n: int) -> ChatLogprobs:
    """/v1/chat/completions format."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        top = [_chat_top(t, lp) for t, lp in top_entries(entry, n)]
        text = token_text(token_id, chosen)
        content.append(ChatLogprobEntry(token=text, logprob=chosen.logprob,
                                        bytes=list(text.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def _chat_top(token_id: int, logprob: Logprob) -> ChatTopLogprob:
    text = token_text(token_id, logprob)
    return ChatTopLogprob(token=text, logprob=logprob.logprob, bytes=list(text.encode()))
