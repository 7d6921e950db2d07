"""HTTP errors: what a supervisor error or a bad request looks like to an API client.

`ApiError` is raised anywhere in a route and rendered by the app in the shape
of the API the route belongs to: OpenAI's `{"error": {message, type, param,
code}}`, or Ollama's `{"error": "..."}`. `from_failure` maps the supervisor's
error codes onto HTTP statuses: an unknown model is 404, a bad request 400, a
full queue 429 and an unavailable model or supervisor 503 (both with
`Retry-After`), and errors no retry can fix carry `x-should-retry: false` so
the openai SDK does not retry them.
"""

from __future__ import annotations

from bastion.protocol import ErrorCode, RequestFailed

_STATUS = {
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_MODEL_FILE: 400,
    ErrorCode.CONTEXT_OVERFLOW: 400,
    ErrorCode.MALFORMED_MESSAGE: 400,
    ErrorCode.DUPLICATE_REQUEST: 409,
    ErrorCode.BUSY: 429,
    ErrorCode.SUPERVISOR_UNAVAILABLE: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.WORKER_DIED: 503,
    ErrorCode.WORKER_UNRESPONSIVE: 503,
    ErrorCode.MODEL_UNLOADED: 503,
    ErrorCode.MODEL_FAILED: 503,
    ErrorCode.MODEL_LOAD_FAILED: 503,
    ErrorCode.INSUFFICIENT_MEMORY: 503,
    ErrorCode.REMOTE_UNREACHABLE: 502,
    ErrorCode.REMOTE_ERROR: 502,
    ErrorCode.REMOTE_INTERRUPTED: 502,
}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.retryable = retryable

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        if self.status >= 500 or self.status in (408, 409, 429):
            headers["x-should-retry"] = "true" if self.retryable else "false"
        return headers

    def openai_body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, object]:
        return {"error": self.message}


def from_failure(failure: RequestFailed) -> ApiError:
    status = _STATUS.get(failure.code, 500)
    retry_after = None
    if status in (429, 503) and (failure.retryable or failure.code is ErrorCode.BUSY):
        retry_after = (failure.retry_after_ms or 1000) / 1000
    code = "model_not_found" if failure.code is ErrorCode.UNKNOWN_MODEL else failure.code.value
    return ApiError(status, failure.message, code=code, retry_after_s=retry_after,
                    retryable=failure.retryable or failure.code is ErrorCode.BUSY)
