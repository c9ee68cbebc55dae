"""Prompt templates shared by the data loader, the built-in demo model and the demo data.

The Alpaca templates are ``str.format`` strings with the fields ``{instruction}``
and ``{input}``.  The data loader renders the prompt with one of them (depending on
whether ``input`` is empty), masks the prompt tokens out of the loss and trains on
``output`` followed by the EOS token.

The built-in demo base model (``builtin:tiny-llama``) is pre-trained on generic
instruction examples rendered with exactly these templates, so it knows the format
(but not the demo fine-tuning task).
"""

from __future__ import annotations

ALPACA_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def format_alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - alpaca field name
    """Render the Alpaca prompt (everything before the response) for one example."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
