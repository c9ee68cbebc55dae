"""Merge a saved adapter (or a freeze job's trained tensors) into its base: a plain transformers
model that loads without peft."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.models.inference import LINEAGE_FILE, check_base, is_merged, read_lineage, read_spec
from orchestrator.spec import SPEC_FILE, JobSpec


def save_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a saved adapter (lora, ia3) or a freeze job's trained tensors into its base and save
    a plain transformers model + tokenizer (with the job spec and lineage) that
    `AutoModelForCausalLM.from_pretrained` loads without peft.

    The base is never quantized here: merging into 4-bit weights would round the sum back to the
    4-bit grid and lose most of what the adapter learned. It is loaded in float32 where the host
    has the memory (`merge_dtype`), and the merged weights are cast once to `model.dtype`. The
    merge runs where inference would (`loading.inference_device`, sized for the merge dtype): on a
    CUDA GPU when the weights fit, else on the CPU; the model is written from there."""
    import shutil

    from orchestrator.models.adapters import load_trained_model
    from orchestrator.models.loading import load_tokenizer, resolve_base, torch_dtype
    from orchestrator.spec import MERGEABLE_METHODS

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    spec = read_spec(adapter_dir)
    if spec.peft.method not in MERGEABLE_METHODS or is_merged(adapter_dir):
        raise ValueError(f"{adapter_dir} holds no adapter to merge (peft.method {spec.peft.method})")
    base_path = resolve_base(spec.model)
    check_base(adapter_dir, spec, base_path)
    precise = spec.model_copy(deep=True)
    precise.model.dtype = merge_dtype(spec, base_path)
    model = load_trained_model(adapter_dir, precise, base_path, quantize=False)
    if spec.peft.method != "freeze":  # a freeze job's tensors are already in place
        model = model.merge_and_unload()
    model = model.to(torch_dtype(spec.model.dtype))  # the one rounding of base + adapter
    model.save_pretrained(out_dir)
    load_tokenizer(base_path, spec.model.trust_remote_code, spec.model.revision,
                   spec.data.chat_template).save_pretrained(out_dir)
    shutil.copy(adapter_dir / SPEC_FILE, out_dir / SPEC_FILE)
    lineage = {**read_lineage(adapter_dir), "merged_from_adapter": True}
    (out_dir / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True), encoding="utf-8")
    return out_dir


def merge_dtype(spec: JobSpec, base_path: str, available_bytes: int | None = None) -> str:
    """The dtype to merge in: float32 when the host's available memory holds the base in float32
    (with a quarter to spare), else `model.dtype`.

    Merging in `model.dtype` rounds twice where the base's files hold more precision than that
    (the built-in base is stored in float32): once when the base is loaded, once when the adapter
    is added. In float32 each merged weight is rounded once, to the nearest bf16/fp16 value of
    base + adapter; on the demo adapter, 10% of the weights merged in bf16 were off by more than
    that half unit. A base stored in bf16 loses nothing either way (peft adds the float32 delta to
    it in float32 and rounds once)."""
    import psutil

    from orchestrator.models.loading import base_weights_dir

    if spec.model.dtype == "float32":
        return "float32"
    folder = base_weights_dir(spec.model, base_path)
    files = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")] if folder else []
    if not files:
        return spec.model.dtype
    # float32 needs at most twice the files' bytes (16-bit files; float32 ones need the same).
    need = 2.5 * sum(f.stat().st_size for f in files)
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    return "float32" if available > need else spec.model.dtype
