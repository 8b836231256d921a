"""Server-sent events, and aborting a request when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.responses import Response

SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client hung up"; nobody reads it


def sse_event(payload: BaseModel) -> str:
    # Streamed chunks leave out null fields, as OpenAI's do (a delta carries only what is new).
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """Starlette cancels `events` when the client disconnects; its `finally` then aborts."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def until_disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request,
                               work: Coroutine[Any, Any, Response]) -> Response:
    """Run a non-streaming handler, cancelling it (and so aborting its requests) if the client
    disconnects first; a streaming response gets the same from Starlette itself."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # its `finally` aborts the engine requests
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return task.result()
