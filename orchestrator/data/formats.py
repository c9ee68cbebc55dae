"""Prompt templates shared by the data loader, the built-in demo model and the demo data.

The Alpaca templates are ``str.format`` strings with the fields ``{instruction}``
and ``{input}``.  The data loader renders the prompt with one of them (depending on
whether ``input`` is empty), masks the prompt tokens out of the loss and trains on
``output`` followed by the EOS token.

The built-in demo base model (``builtin:tiny-llama``) is pre-trained on generic
instruction examples rendered with exactly these templates, so it knows the format
(but not the demo fine-tuning task).

The formatters turn one record of each data format (alpaca, chat, text) into its full text and
the character spans whose tokens are trained.
"""

from __future__ import annotations

from orchestrator.spec import DataSpec

ALPACA_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def format_alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - alpaca field name
    """Render the Alpaca prompt (everything before the response) for one example."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# --- formatters: record -> (text, trained character spans) ------------------------------------


def _format_alpaca(record: dict, tokenizer, data: DataSpec) -> tuple[str, list[tuple[int, int]], bool]:
    prompt = format_alpaca_prompt(str(record["instruction"]), str(record.get("input") or ""))
    text = prompt + str(record["output"])
    return text, [(len(prompt), len(text))], True


def _format_text(record: dict, tokenizer, data: DataSpec) -> tuple[str, list[tuple[int, int]], bool]:
    text = str(record[data.text_field])
    return text, [(0, len(text))], True


# ShareGPT's records (as Axolotl, LLaMA-Factory and FastChat read them): {"conversations": [{"from":
# "human", "value": ...}, {"from": "gpt", "value": ...}], "system": optional}; read as chat messages.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def chat_key(record: dict) -> str | None:
    """The field holding a chat record's turns: `messages`, or ShareGPT's `conversations`; None
    when the record has neither."""
    return next((key for key in ("messages", "conversations") if key in record), None)


def chat_messages(record: dict):
    """A chat record's messages: its `messages`, or a ShareGPT record's `conversations` (each
    `from`/`value` turn as a role/content message, human -> user and gpt -> assistant; the record's
    `system`, if any, first); None when the record has neither. A turn that is not a from/value
    object is passed on as it is (the record's check then names it)."""
    key = chat_key(record)
    if key != "conversations":
        return record.get("messages")
    turns = record[key]
    if not isinstance(turns, list):
        return turns
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t.get("value")}
                     if isinstance(t, dict) and "from" in t else t for t in turns]


def _format_chat(record: dict, tokenizer, data: DataSpec) -> tuple[str, list[tuple[int, int]], bool]:
    messages = chat_messages(record)
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        # The assistant turn's characters are those the template adds after the prompt for it.
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        spans.append((start, end))
    # The chat template writes its own end-of-turn tokens, so no extra EOS is appended.
    return text, spans, False


def prompt_and_reference(record: dict, fmt: str, tokenizer) -> tuple[str, str, str | None]:
    """(prompt as a person wrote it, that prompt formatted as the model was trained, the reference
    answer) of a record: alpaca's instruction (and input) and output, formatted as `orchestrator
    generate` formats them; a chat's conversation up to its last assistant turn, rendered with the
    chat template, and that turn; a text record has no prompt to complete and no reference."""
    if fmt == "alpaca":
        instruction, input_text = str(record["instruction"]), str(record.get("input") or "")
        prompt = f"{instruction}\n{input_text}" if input_text else instruction
        return prompt, format_alpaca_prompt(instruction, input_text), str(record["output"])
    if fmt == "chat":
        messages = chat_messages(record)
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            return str(messages[-1].get("content", "")), "", None
        text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        users = [m for m in messages[:last] if m.get("role") == "user"]
        return str(users[-1]["content"]) if users else "", text, str(messages[last]["content"])
    return str(record.get("text", ""))[:200], "", None


_FORMATTERS = {"alpaca": (_format_alpaca, ("instruction", "output")),
               "text": (_format_text, None),
               "chat": (_format_chat, ("messages",))}
