"""The OpenAI-compatible request and response shapes `orchestrator serve` speaks (the subset a
greedy server needs: model, prompt or messages, max_tokens, stream); pure functions, no web
framework."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator

DEFAULT_MAX_TOKENS = 64  # as `orchestrator generate`


class RequestError(ValueError):
    """A request the API refuses (HTTP 400/404), with the field it names."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status

    def to_json(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param}}


def parse(body: dict, chat: bool, served: list[str]) -> dict:
    """The arguments of a completion: model, prompt (or messages), max_tokens, stream (and
    stream_options.include_usage as include_usage). Sampling options (temperature, top_p) are
    accepted and ignored: the server decodes greedily."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    model = body.get("model")
    if not model:
        raise RequestError(f"model: missing; one of {', '.join(served)}", "model")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("max_tokens: must be a positive integer", "max_tokens")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("stream: must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options: must be an object such as {\"include_usage\": true}", "stream_options")
    args = {"model": model, "max_tokens": max_tokens, "stream": stream,
            "include_usage": stream and bool(options.get("include_usage"))}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("messages: must be a non-empty list of {role, content} objects", "messages")
        return {**args, "messages": messages}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt: must be a string", "prompt")
    return {**args, "prompt": prompt}


def _header(model: str, served_as: str, chat: bool) -> dict:
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": model, "system_fingerprint": served_as}


def _usage(prompt_tokens: int, tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}


def _finish_reason(tokens: int, max_tokens: int) -> str:
    """"length" when the answer used every token it was allowed (re-tokenizing the answer may
    count one token off at the limit), else "stop"."""
    return "length" if tokens >= max_tokens else "stop"


def completion(model: str, text: str, served_as: str, chat: bool, prompt_tokens: int, tokens: int,
               max_tokens: int) -> dict:
    """A `text_completion` or `chat.completion` object with one choice."""
    common = {**_header(model, served_as, chat), "usage": _usage(prompt_tokens, tokens)}
    finish = _finish_reason(tokens, max_tokens)
    if chat:
        return {**common, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}
    return {**common, "object": "text_completion", "choices": [
        {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def stream_events(model: str, pieces: Iterable[str], served_as: str, chat: bool, prompt_tokens: int,
                  count_tokens: Callable[[str], int], max_tokens: int, include_usage: bool = False) -> Iterator[str]:
    """A streamed completion as OpenAI streams it (server-sent events, `data: {json}`): one chunk
    per piece of the answer as `pieces` yields it (`chat.completion.chunk`s with `delta`s, the
    first naming the assistant's role, or `text_completion` chunks), a last chunk with the
    finish_reason, with include_usage one more with the usage and no choices, then `data: [DONE]`.
    `count_tokens` counts the whole answer's tokens once it is written."""
    header = _header(model, served_as, chat)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict], **extra) -> str:
        usage = {"usage": None} if include_usage else {}
        return f"data: {json.dumps({**header, 'object': kind, 'choices': choices, **usage, **extra})}\n\n"

    def choice(text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta = {**({"role": "assistant"} if role else {}), **({"content": text} if text is not None else {})}
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    if chat:
        yield event([choice("", role=True)])
    answer = ""
    for piece in pieces:
        if piece:
            answer += piece
            yield event([choice(piece)])
    tokens = count_tokens(answer)
    yield event([choice(None, _finish_reason(tokens, max_tokens))])
    if include_usage:
        yield event([], usage=_usage(prompt_tokens, tokens))
    yield "data: [DONE]\n\n"


def model_list(models: dict[str, str]) -> dict:
    """`/v1/models`: each served reference, with the version it is served as now."""
    return {"object": "list", "data": [{"id": ref, "object": "model", "owned_by": "orchestrator", "version": v}
                                       for ref, v in models.items()]}
