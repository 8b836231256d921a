"""Errors the front-ends raise to their callers when the engine cannot serve a request."""


class EngineDeadError(RuntimeError):
    """The engine has stopped (shut down, its core process or a worker died, or its state
    could not be recovered): no request will be served any more."""


class EngineStepError(RuntimeError):
    """A step failed; the requests that were in flight are aborted and get this error."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting to be scheduled; retry later (a server's 503)."""
