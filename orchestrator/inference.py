"""Load a trained adapter with its base, and complete prompts with it (greedy decoding)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.spec import JobSpec

SPEC_FILE = "job.yaml"


@dataclass
class Loaded:
    model: object
    tokenizer: object
    spec: JobSpec


def load_adapter(adapter_dir: str | Path, with_adapter: bool = True) -> Loaded:
    """The base named by the adapter's saved job spec, quantized as it was trained, plus the
    adapter (or, with `with_adapter=False`, the bare base for comparison)."""
    from orchestrator.base_model import load_base, load_tokenizer, load_trained_model, resolve_base

    adapter_dir = Path(adapter_dir)
    spec_file = adapter_dir / SPEC_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no {SPEC_FILE}: not an adapter this tool saved")
    spec = JobSpec.model_validate(yaml.safe_load(spec_file.read_text(encoding="utf-8")))
    base_path = resolve_base(spec.model)
    if with_adapter:
        model = load_trained_model(adapter_dir, spec, base_path)
    else:
        model = load_base(spec, base_path)
        model.eval()
    return Loaded(model=model, tokenizer=load_tokenizer(base_path), spec=spec)


def format_prompt(loaded: Loaded, prompt: str) -> str:
    """Wrap a bare prompt the way the adapter's training data was formatted."""
    fmt = loaded.spec.data.format
    if fmt == "alpaca":
        from orchestrator.prompt_templates import format_alpaca_prompt

        instruction, _, input_text = prompt.partition("\n")
        return format_alpaca_prompt(instruction, input_text)
    if fmt == "chat":
        return loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    tokenize=False, add_generation_prompt=True)
    return prompt


def complete(loaded: Loaded, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy completion of `prompt` (formatted as in training); the prompt is not repeated."""
    import torch

    tok = loaded.tokenizer
    enc = tok(format_prompt(loaded, prompt), return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
