"""Chat messages -> the model's chat template -> prompt text and token ids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import ChatMessage
from pagedllm.inputs import TokensPrompt

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import AsyncLLM

TEXT_PART_TYPES = ("text", "input_text")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name; templates know "system"


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one string: a list of text parts is joined with newlines."""
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type")
        text = part.get("text")
        if kind not in TEXT_PART_TYPES or not isinstance(text, str):
            raise OpenAIError.bad_request(
                f"messages[{index}]: content part of type {kind!r} is not supported; this "
                "server takes text parts only ({'type': 'text', 'text': ...})",
                f"messages.{index}.content")
        texts.append(text)
    return "\n".join(texts)


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    result = []
    for index, message in enumerate(messages):
        entry: dict[str, Any] = {"role": ROLE_ALIASES.get(message.role, message.role),
                                 "content": message_text(message, index)}
        if message.name:
            entry["name"] = message.name
        result.append(entry)
    return result


async def render_chat(engine: AsyncLLM, messages: list[ChatMessage], add_generation_prompt: bool,
                      continue_final_message: bool) -> TokensPrompt:
    """Apply the chat template and tokenize on the engine's input thread (off the event loop);
    a template error, or a conversation too long to fit the context, is the client's 400."""
    turns = conversation(messages)
    tokenizer = engine.tokenizer

    def render() -> TokensPrompt:
        try:
            text = tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)
        except Exception as exc:  # jinja and transformers raise many kinds for a bad conversation
            raise OpenAIError.bad_request(f"cannot apply the chat template to these messages: "
                                          f"{exc}", "messages") from exc
        try:
            engine.input_processor.check_prompt_text(text, "conversation")
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc), "messages") from exc
        # The template wrote any BOS it wants already (as LLM.chat does).
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    return await engine.run_input_work(render)
