"""POST /tokenize and /detokenize (vLLM's extras): what the engine would see for a prompt.

Both run on the engine's input thread, never on the event loop, and refuse at once what could
not be a prompt: text too long for max_model_len tokens, more ids than max_model_len."""

from __future__ import annotations

from pagedllm.entrypoints.openai.chat_utils import (
    TemplateOptions,
    check_template_kwargs,
    render_chat,
)
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing


class OpenAIServingTokens(OpenAIServing):
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.models.resolve(request.model)
        tokenizer = self.require_tokenizer()
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError.bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
        if request.messages is not None:
            options = TemplateOptions(
                request.add_generation_prompt, request.continue_final_message,
                request.chat_template or self.chat_template,
                [tool.model_dump(exclude_none=True) for tool in request.tools or []] or None,
                check_template_kwargs(request.chat_template_kwargs))
            rendered = await render_chat(self.engine, request.messages, options)
            token_ids = rendered["prompt_token_ids"]
        else:
            token_ids = await self.engine.run_input_work(self._encode, request.prompt,
                                                         request.add_special_tokens)
        strs = None
        if request.return_token_strs:
            strs = await self.engine.run_input_work(tokenizer.convert_ids_to_tokens, token_ids)
        return TokenizeResponse(count=len(token_ids), tokens=token_ids, token_strs=strs,
                                max_model_len=self.models.max_model_len)

    def _encode(self, prompt: str, add_special_tokens: bool) -> list[int]:
        try:
            self.engine.input_processor.check_prompt_text(prompt)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc), "prompt") from exc
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.models.resolve(request.model)
        tokenizer = self.require_tokenizer()
        limit = self.models.max_model_len
        if len(request.tokens) > limit:
            raise OpenAIError.bad_request(f"tokens has {len(request.tokens)} ids; at most "
                                          f"max_model_len ({limit}) can be detokenized", "tokens")
        self.check_token_ids(request.tokens, "tokens")
        text = await self.engine.run_input_work(tokenizer.decode, request.tokens)
        return DetokenizeResponse(prompt=text)
