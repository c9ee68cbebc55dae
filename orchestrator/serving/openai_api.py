"""The OpenAI-compatible request and response shapes `orchestrator serve` speaks (the subset a
greedy server needs: model, prompt or messages, max_tokens); pure functions, no web framework."""

from __future__ import annotations

import time
import uuid

DEFAULT_MAX_TOKENS = 64  # as `orchestrator generate`


class RequestError(ValueError):
    """A request the API refuses (HTTP 400/404), with the field it names."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status

    def to_json(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param}}


def parse(body: dict, chat: bool, served: list[str]) -> dict:
    """The arguments of a completion: model, prompt (or messages), max_tokens. Sampling options
    (temperature, top_p) are accepted and ignored: the server decodes greedily."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    model = body.get("model")
    if not model:
        raise RequestError(f"model: missing; one of {', '.join(served)}", "model")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("max_tokens: must be a positive integer", "max_tokens")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("messages: must be a non-empty list of {role, content} objects", "messages")
        return {"model": model, "messages": messages, "max_tokens": max_tokens}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt: must be a string", "prompt")
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens}


def completion(model: str, text: str, served_as: str, chat: bool, prompt_tokens: int, tokens: int,
               max_tokens: int) -> dict:
    """A `text_completion` or `chat.completion` object with one choice. `finish_reason` is
    "length" when the answer used every token it was allowed (re-tokenizing the answer may count
    one token off at the limit), else "stop"."""
    finish = "length" if tokens >= max_tokens else "stop"
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
    common = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
              "model": model, "system_fingerprint": served_as, "usage": usage}
    if chat:
        return {**common, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}
    return {**common, "object": "text_completion", "choices": [
        {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def model_list(models: dict[str, str]) -> dict:
    """`/v1/models`: each served reference, with the version it is served as now."""
    return {"object": "list", "data": [{"id": ref, "object": "model", "owned_by": "orchestrator", "version": v}
                                       for ref, v in models.items()]}
