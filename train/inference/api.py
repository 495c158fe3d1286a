"""The OpenAI API's request bodies as the server reads them, and its error JSON.

Fields that change what is generated and that we do not implement (n > 1, logprobs,
echo, penalties, tools, ...) are refused with a 400 naming them rather than ignored;
fields that change nothing here (user, metadata, store, ...) and unknown ones are
ignored, as vLLM ignores them. `top_k` and `ignore_eos` are accepted beside OpenAI's
fields (vLLM's extensions, sent with the client's `extra_body`).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

import pydantic

MAX_SEED = 2**31  # seeds are int32 on the device


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(pydantic.BaseModel):
    include_usage: bool = False


class _Common(pydantic.BaseModel):
    """What completions and chat completions share."""
    model_config = pydantic.ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: float = pydantic.Field(1.0, ge=0, le=2)
    top_p: float = pydantic.Field(1.0, gt=0, le=1)
    top_k: int = pydantic.Field(0, ge=-1)  # -1 or 0: no cut
    seed: Optional[int] = pydantic.Field(None, ge=0, lt=MAX_SEED)
    stop: Union[str, list[str], None] = None
    ignore_eos: bool = False  # exactly max_tokens tokens (benchmarks)
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None

    def unsupported(self) -> list[str]:
        """The fields set to something we do not implement."""
        out = []
        if self.n != 1:
            out.append("n")
        if self.logprobs not in (None, False):
            out.append("logprobs")
        if self.presence_penalty or self.frequency_penalty:
            out.append("presence_penalty" if self.presence_penalty else "frequency_penalty")
        if self.logit_bias:
            out.append("logit_bias")
        return out

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop has {len(stops)} strings; at most 4 are allowed",
                           param="stop")
        return stops


class CompletionRequest(_Common):
    # a text, token ids, or a list of either (one choice each)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = pydantic.Field(16, ge=1)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.echo:
            out.append("echo")
        if self.suffix:
            out.append("suffix")
        if self.best_of not in (None, 1):
            out.append("best_of")
        return out


class Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # name, tool_call_id, ... to the template

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        """The content as one string (a list of text parts joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"a {self.role} message has a content part of type "
                               f"{part.get('type')!r}; this model reads text parts only",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[Message] = pydantic.Field(min_length=1)
    max_tokens: Optional[int] = pydantic.Field(None, ge=1)
    max_completion_tokens: Optional[int] = pydantic.Field(None, ge=1)
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Any = None
    response_format: Optional[dict] = None

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.top_logprobs:
            out.append("top_logprobs")
        if self.tools:
            out.append("tools")
        if self.tool_choice not in (None, "none", "auto"):
            out.append("tool_choice")
        if self.response_format and self.response_format.get("type", "text") != "text":
            out.append("response_format")
        return out

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse(body: bytes, model: type[pydantic.BaseModel]):
    """A request body as `model`, or a 400 ApiError naming the first problem (never the
    framework's 422)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(data)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    bad = request.unsupported()
    if bad:
        raise ApiError(400, f"{bad[0]}={getattr(request, bad[0])!r} is not supported by this "
                       "server; leave it out", param=bad[0])
    return request
