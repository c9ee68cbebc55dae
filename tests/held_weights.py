"""The check that a registered version is the model DeepSpeed trained, shared by the tests that
train through the real path (tests/test_peft_methods.py, tests/test_architectures.py)."""

from __future__ import annotations

from pathlib import Path


def deepspeed_held(summary) -> dict:
    """The module state DeepSpeed held at a run's last step, from its own checkpoint (ZeRO-0/1/2:
    whole tensors; ZeRO-3's checkpoint holds shards)."""
    import torch

    from orchestrator.training.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG

    checkpoint = Path(summary.measured["artifact_dir"]).parent
    [states] = (checkpoint / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("mp_rank_00_model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def assert_same_logits_as_deepspeed_held(reference, loaded, summary, records, micro_batch_size: int,
                                         batches: int = 1, what: str = "") -> None:
    """The registered version (`loaded`, from save -> MLflow -> download -> load) gives the logits
    of the weights DeepSpeed held at the last step (its own checkpoint, an independent path) put
    into `reference`, a freshly built model whose trainable parameters are what the run trained,
    on the first `batches` micro batches of `records`."""
    import torch

    from orchestrator.data.tokenize import collate

    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    held = deepspeed_held(summary)
    assert trainable <= set(held), sorted(trainable - set(held))[:3]
    reference.load_state_dict({n: held[n] for n in trainable}, strict=False)
    reference.eval()
    loaded.model.eval()
    with torch.no_grad():
        for start in range(0, batches * micro_batch_size, micro_batch_size):
            batch = collate(records[start:start + micro_batch_size], loaded.tokenizer.pad_token_id)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            expected, got = reference(**inputs).logits.float(), loaded.model(**inputs).logits.float()
            assert got.shape == expected.shape, what
            # bf16 weights and activations: equal up to bf16 rounding of the last layers' sums
            assert torch.allclose(got, expected, rtol=1e-2, atol=1e-2), (what, (got - expected).abs().max())
