"""A checkpoint of a run: what was trained (`adapter/`, what registration uses) and the full
training state beside it, so that a restarted worker group or a resumed run continues exactly."""

from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

ADAPTER_DIR = "adapter"
# A checkpoint holds, beside `adapter/` (what registration uses), everything needed to continue
# exactly: DeepSpeed's state (trainable weights, optimizer, scheduler; one shard per rank under
# ZeRO), the step and base eval loss, and each rank's RNG states.
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
TRAIN_STATE_FILE = "train_state.json"
PENDING_METRICS_FILE = "pending_metrics.json"


def save_trained(engine, out_dir: str, rank: int, zero_stage: int, method: str) -> None:
    """Write what was trained from rank 0: the adapter (weights + config), for `freeze` the
    trained tensors alone, or for `full` the whole model. Under ZeRO-3 the partitioned weights
    are gathered first (a collective).

    For an adapter only the trainable tensors are read: asking the whole model for its state
    dict would also serialize the frozen 4-bit base, which is neither needed nor possible while
    ZeRO-3 holds it.
    """
    import deepspeed

    model = engine.module
    if method == "full":
        state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else model.state_dict()
        if rank == 0:
            model.save_pretrained(out_dir, state_dict=state)
        return
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gather = (deepspeed.zero.GatheredParameters(list(trainable.values()), modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:  # collective under ZeRO-3: every rank enters
        if rank == 0:
            state = {n: p.detach().cpu().clone() for n, p in trainable.items()}
            if method == "freeze":
                from safetensors.torch import save_file

                from orchestrator.models.adapters import TRAINED_TENSORS

                os.makedirs(out_dir, exist_ok=True)
                save_file(state, os.path.join(out_dir, TRAINED_TENSORS), metadata={"format": "pt"})
            else:
                model.save_pretrained(out_dir, state_dict=state)


@dataclass
class TrainState:
    """Where a run is, beyond the DeepSpeed state: the last finished optimizer step, and the
    base model's eval loss (measured once, at step 0)."""

    step: int = 0
    base_eval_loss: float | None = None


def rng_states() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(engine, out_dir: str, rank: int, state: TrainState) -> None:
    """Write this rank's part of a full-state checkpoint into `out_dir` (a collective: every
    rank calls it). DeepSpeed writes the trainable weights once and the optimizer state as one
    shard per rank; frozen base weights are left out (each worker rebuilds the base)."""
    import torch

    engine.save_checkpoint(os.path.join(out_dir, DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    torch.save(rng_states(), os.path.join(out_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        Path(out_dir, TRAIN_STATE_FILE).write_text(json.dumps(state.__dict__), encoding="utf-8")


def restore_state(engine, rank: int) -> TrainState | None:
    """The state of the latest checkpoint Ray Train holds for this run (after a worker failure,
    or when the driver re-attaches to a stopped run), loaded into `engine` and the RNGs; None
    when there is none."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        if not Path(d, TRAIN_STATE_FILE).is_file():  # a checkpoint from before full-state saves
            return None
        engine.load_checkpoint(os.path.join(d, DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False)
        state = TrainState(**json.loads(Path(d, TRAIN_STATE_FILE).read_text(encoding="utf-8")))
        rng = Path(d, f"rng_rank{rank}.pt")
        if rng.is_file():  # absent when the run resumes on more workers than it saved from
            set_rng_states(torch.load(rng, weights_only=False))
    return state
