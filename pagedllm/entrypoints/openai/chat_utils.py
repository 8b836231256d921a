"""Chat messages -> the model's chat template -> prompt text and token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import ChatMessage, ToolCall
from pagedllm.inputs import TokensPrompt
from pagedllm.tokenizer import reserved_template_kwargs

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import AsyncLLM

TEXT_PART_TYPES = ("text", "input_text", "output_text")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name; templates know "system"
@dataclass(slots=True)
class TemplateOptions:
    """How one conversation is rendered: everything apply_chat_template takes but the turns."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # None: the model's own
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, as the template sees
    kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    reserved = reserved_template_kwargs(kwargs)
    if reserved:
        raise OpenAIError.bad_request(f"chat_template_kwargs may not set {', '.join(reserved)} "
                                      "(give them as request fields)", "chat_template_kwargs")
    return dict(kwargs or {})


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


def template_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """An assistant's earlier calls as templates expect them: arguments as a dict (Qwen's,
    Llama's and Hermes' templates write them with `tojson`); arguments that are not a JSON
    object stay the text they are."""
    return [{"id": call.id, "type": "function",
             "function": {"name": call.function.name,
                          "arguments": _json_object(call.function.arguments)}}
            for call in calls]


def _json_object(text: str) -> dict[str, Any] | str:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    result = []
    for index, message in enumerate(messages):
        entry: dict[str, Any] = {"role": ROLE_ALIASES.get(message.role, message.role),
                                 "content": message_text(message, index)}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = template_tool_calls(message.tool_calls)
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


def apply_template(tokenizer: Any, turns: list[dict[str, Any]], options: TemplateOptions) -> str:
    """The rendered conversation; a template error is the client's 400."""
    try:
        return tokenizer.apply_chat_template(
            turns, tools=options.tools, chat_template=options.chat_template, tokenize=False,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, **options.kwargs)
    except Exception as exc:  # jinja and transformers raise many kinds for a bad conversation
        raise OpenAIError.bad_request(f"cannot apply the chat template to these messages: "
                                      f"{exc}", "messages") from exc


async def render_chat(engine: AsyncLLM, messages: list[ChatMessage],
                      options: TemplateOptions) -> TokensPrompt:
    """Apply the chat template and tokenize on the engine's input thread (off the event loop);
    a template error, or a conversation too long to fit the context, is the client's 400."""
    turns = conversation(messages)
    tokenizer = engine.tokenizer
    for index, turn in enumerate(turns):  # each message fits, whatever the template keeps
        try:
            engine.input_processor.check_prompt_text(turn["content"],
                                                     f"content of messages[{index}]")
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc), f"messages.{index}.content") from exc

    def render() -> TokensPrompt:
        text = apply_template(tokenizer, turns, options)
        try:
            engine.input_processor.check_prompt_text(text, "conversation")
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc), "messages") from exc
        # The template wrote any BOS it wants already (as LLM.chat does).
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    return await engine.run_input_work(render)
