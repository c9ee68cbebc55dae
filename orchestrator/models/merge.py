"""Merge a saved adapter (or a freeze job's trained tensors) into its base: a plain transformers
model that loads without peft."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.models.inference import LINEAGE_FILE, check_base, is_merged, read_lineage, read_spec
from orchestrator.spec import SPEC_FILE


def save_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a saved adapter (lora, ia3) or a freeze job's trained tensors into its base and save
    a plain transformers model + tokenizer (with the job spec and lineage) that
    `AutoModelForCausalLM.from_pretrained` loads without peft.

    The base is loaded in its compute dtype, never quantized: merging into 4-bit weights would
    round the sum back to the 4-bit grid and lose most of what the adapter learned."""
    import shutil

    from orchestrator.models.adapters import load_trained_model
    from orchestrator.models.loading import load_tokenizer, resolve_base
    from orchestrator.spec import MERGEABLE_METHODS

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    spec = read_spec(adapter_dir)
    if spec.peft.method not in MERGEABLE_METHODS or is_merged(adapter_dir):
        raise ValueError(f"{adapter_dir} holds no adapter to merge (peft.method {spec.peft.method})")
    base_path = resolve_base(spec.model)
    check_base(adapter_dir, spec, base_path)
    model = load_trained_model(adapter_dir, spec, base_path, quantize=False)
    if spec.peft.method != "freeze":  # a freeze job's tensors are already in place
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    load_tokenizer(base_path).save_pretrained(out_dir)
    shutil.copy(adapter_dir / SPEC_FILE, out_dir / SPEC_FILE)
    lineage = {**read_lineage(adapter_dir), "merged_from_adapter": True}
    (out_dir / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True), encoding="utf-8")
    return out_dir
