"""The OpenAI-compatible request and response shapes `orchestrator serve` speaks (model, prompt or
messages, max_tokens, stream, temperature / top_p / seed and stop; the rest of the API refused by
name); pure functions, no web framework."""

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


# The most stop strings a request may give, as OpenAI's API allows.
MAX_STOP = 4
# Options of OpenAI's API this server does not have: asking for them is an error, not silently ignored.
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": None, "logprobs": None, "top_logprobs": None, "suffix": None,
               "tools": None, "functions": None,
               "response_format": {"type": "text"}}


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        bounds = f"above {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}"
        raise RequestError(f"{key}: must be a number {bounds}", key)
    return float(value)


def _decoding(body: dict) -> dict:
    """The decoding a request asks for (models.inference.Decoding's fields): greedy unless
    `temperature` > 0; `top_p`, `seed`, `stop` (a string or up to MAX_STOP of them)."""
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("seed: must be an integer", "seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(x, str) and x for x in stop):
        raise RequestError(f"stop: must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return {"temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), "seed": seed, "stop": tuple(stop)}


def parse(body: dict, chat: bool, served: list[str]) -> dict:
    """The arguments of a completion: model, prompt (or messages), max_tokens, stream (and
    stream_options.include_usage as include_usage), and decoding (`_decoding`: greedy unless the
    request sets a temperature). Options the server does not have (n > 1, logprobs, echo, tools,
    ...) are refused by name."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    model = body.get("model")
    if not model:
        raise RequestError(f"model: missing; one of {', '.join(served)}", "model")
    for key, neutral in UNSUPPORTED.items():
        if (value := body.get(key)) and value != neutral:
            also = "" if neutral is None else f" or set it to {json.dumps(neutral)}"
            raise RequestError(f"{key}: not supported by this server (leave it out{also})", key)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("max_tokens: must be a positive integer", "max_tokens")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("stream: must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options: must be an object such as {\"include_usage\": true}", "stream_options")
    args = {"model": model, "max_tokens": max_tokens, "stream": stream, "decoding": _decoding(body),
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
