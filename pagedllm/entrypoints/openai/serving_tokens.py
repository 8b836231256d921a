"""POST /tokenize and /detokenize (vLLM's extras): what the engine would see for a prompt."""

from __future__ import annotations

import asyncio

from pagedllm.entrypoints.openai.chat_utils import render_chat
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
            rendered = await render_chat(tokenizer, request.messages,
                                         request.add_generation_prompt,
                                         request.continue_final_message)
            token_ids = rendered["prompt_token_ids"]
        else:
            token_ids = await asyncio.to_thread(tokenizer.encode, request.prompt,
                                                add_special_tokens=request.add_special_tokens)
        strs = tokenizer.convert_ids_to_tokens(token_ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(token_ids), tokens=token_ids, token_strs=strs,
                                max_model_len=self.models.max_model_len)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.models.resolve(request.model)
        tokenizer = self.require_tokenizer()
        self.check_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))
