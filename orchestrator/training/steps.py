"""What one worker does with its batches: the data order (`micro_batches`, `eval_batches`, streamed
straight from the tokenized Parquet files), an optimizer step (loss weighted by token, the output
layer run on the trained positions only), an evaluation, and its peak memory. torch is imported
inside the functions."""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from dataclasses import dataclass

from orchestrator.data.records import IGNORE_INDEX, Example
from orchestrator.data.tokenize import collate, pack_examples


# --- data order ------------------------------------------------------------------------------

# Each epoch's order: the rows in their stored order, shuffled (seeded by the epoch) within
# windows of this many rows. Every rank reads the same rows in the same order and keeps every
# world-th one, so a step number locates each rank's place without any iterator state.
SHUFFLE_WINDOW = 4096
# Evaluation reads at most this many batches per rank when training.eval_batches is unset: an
# evaluation costs the same whatever the size of the eval set.
DEFAULT_EVAL_BATCHES = 32


def dataset_examples(row_batches, eval_rows: bool, start_now: bool = False):
    """A function that streams one pass of the training (or eval) examples, in their stored
    order, one batch of rows in memory. `row_batches()` starts a pass over the rows: batches as
    dicts of columns (`TokenizedData.row_batches`).

    `start_now`: the first pass starts at once in a thread and reads its first batch of rows, so
    that opening the files (in remote storage, a round trip or more) overlaps the model's load
    instead of delaying the first step; the first call of the function takes that pass over."""
    from orchestrator.data.pipeline import rows_to_examples

    def batches():
        return iter(row_batches())

    early: dict = {}

    def start():
        try:
            early["batches"] = batches()
            early["first"] = next(early["batches"], None)
        except BaseException as err:  # raised again where the pass is read
            early["error"] = err

    thread = threading.Thread(target=start, name="first-data-pass", daemon=True) if start_now else None
    if thread:
        thread.start()

    def one_pass():
        nonlocal thread
        if thread:
            thread.join()
            thread = None
            if "error" in early:
                raise early.pop("error")
            rest, first = early.pop("batches"), early.pop("first")
            stream = rest if first is None else itertools.chain([first], rest)
        else:
            stream = batches()
        for batch in stream:
            yield from rows_to_examples(batch, eval_rows)

    return one_pass


def _shuffled(examples, seed: int, epoch: int, window: int):
    buffer, k = [], 0
    for example in examples:
        buffer.append(example)
        if len(buffer) == window:
            random.Random(f"{seed}:{epoch}:{k}").shuffle(buffer)
            yield from buffer
            buffer, k = [], k + 1
    random.Random(f"{seed}:{epoch}:{k}").shuffle(buffer)
    yield from buffer


def packed_micro_batches(one_pass, micro: int, rank: int, world: int, seed: int, max_seq_len: int,
                         start: int = 0, window: int = SHUFFLE_WINDOW):
    """`micro_batches` with each rank's examples packed into rows of `max_seq_len` tokens
    (`pack_examples`), `micro` rows per batch. How many rows an epoch fills depends on the
    examples' lengths, so a resumed run reads (and packs, without training) the `start` batches
    it skips."""
    epoch = 0
    while True:
        mine = itertools.islice(_shuffled(one_pass(), seed, epoch, window), rank, None, world)
        rows = pack_examples(mine, max_seq_len)
        yielded = False
        while batch := list(itertools.islice(rows, micro)):
            if len(batch) < micro:
                break
            yielded = True
            if start:
                start -= 1
                continue
            yield batch
        if not yielded:
            raise _too_few(rank, world, micro)
        epoch += 1


def _too_few(rank: int, world: int, micro: int) -> ValueError:
    """A pass gave this rank no full micro batch: the stream would never yield one."""
    return ValueError(f"rank {rank} of {world} got too few training examples for one micro batch of {micro}")


def micro_batches(one_pass, num_examples: int | None, micro: int, rank: int, world: int, seed: int, start: int = 0,
                  window: int = SHUFFLE_WINDOW):
    """An endless stream of this rank's micro batches. `one_pass()` streams the training examples
    in a fixed order (`num_examples` of them; None: not known yet, the data still being
    tokenized); each epoch shuffles them within windows (seeded by the epoch) and deals them
    round-robin across ranks (as `DistributedSampler` does), and a rank's last partial batch of an
    epoch is left out. `start` skips that many batches, so a resumed run sees exactly the batches
    an uninterrupted one would: located by the count, or read and passed over without it."""
    per_epoch = None if num_examples is None else len(range(rank, num_examples, world)) // micro
    epoch, skip = divmod(start, per_epoch) if per_epoch else (0, 0)
    skip_read = start if per_epoch is None else 0
    while True:
        mine = itertools.islice(_shuffled(one_pass(), seed, epoch, window), rank, None, world)
        if per_epoch is not None:
            mine = itertools.islice(mine, per_epoch * micro)
        batch, yielded = [], False
        for i, example in enumerate(mine):
            if i >= skip * micro:
                batch.append(example)
                if len(batch) == micro:
                    yielded = True
                    if skip_read:
                        skip_read -= 1
                    else:
                        yield batch
                    batch = []
        if not yielded:
            raise _too_few(rank, world, micro)
        epoch, skip = epoch + 1, 0


def eval_batches(examples, size: int, rank: int, world: int, cap: int | None):
    """This rank's eval batches with a weight each, from an iterable of the eval examples in
    order: batch i goes to rank i % world, at most `cap` batches per rank. Every rank gets the
    same number of batches (ZeRO-3's forward is collective), padding with weight-0 repeats where
    it has fewer."""
    mine, first, total = [], None, 0
    rows = iter(examples)
    while not (cap and total >= cap * world):
        batch = list(itertools.islice(rows, size))
        if not batch:
            break
        first = first or batch
        if total % world == rank:
            mine.append((batch, 1.0))
        total += 1
    if first is None:
        return []
    per_rank = math.ceil(total / world)
    return mine + [(first, 0.0)] * (per_rank - len(mine))


# --- steps -----------------------------------------------------------------------------------


def all_reduce_sum(values, device) -> list[float]:
    """Sum over all ranks of a few numbers (floats or 0-d tensors on `device`, or one 1-d float64
    tensor there): one transfer."""
    import torch
    import torch.distributed as dist

    t = values if isinstance(values, torch.Tensor) else torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def trained_tokens(labels) -> int:
    """The positions a causal LM is scored on: labels after the first position that are not masked."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict, device) -> dict:
    """A collated batch on `device`. To a GPU from pinned host memory, without blocking: a copy
    from ordinary (pageable) memory makes the host wait until the GPU has finished everything
    queued before it, so the host could not queue a micro batch's kernels while the GPU still ran
    the previous ones (a host sync per micro batch)."""
    import torch

    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


# How many steps' micro batches a worker reads ahead: their token counts are summed over the ranks
# in one all-reduce, which also carries the losses of the steps trained since the one before.
# Two all-reduces of a few numbers per step (the counts before it, the loss after it) each made
# both ranks wait for the slower one: 6-8% of a 2-rank QLoRA step on 2 CPU cores
# (docs/benchmarks.md), and on a GPU each is a host sync.
STEPS_AHEAD = 16


@dataclass
class StepBatches:
    """One optimizer step's micro batches (collated, on the host) and their token counts."""

    batches: list  # grad_accum collated micro batches
    counts: list[int]  # trained tokens (scored positions) of each, on this rank
    total: float  # the step's trained tokens on all ranks
    tokens: float  # the step's real tokens (padding left out) on all ranks
    local_tokens: int  # this rank's real tokens
    slots: int  # this rank's rows x width


class StepFeed:
    """The micro batches of a worker's coming steps, read `ahead` steps at a time. One all-reduce
    per read sums the steps' token counts over the ranks and the train losses of the steps
    trained since the last read (each rank reads, trains and settles the same steps, so their
    collectives match). A step's loss and gradient norm are known at the next read, or at `settle()`."""

    def __init__(self, stream, grad_accum: int, pad_id: int, device, ahead: int = STEPS_AHEAD):
        self.stream, self.grad_accum, self.pad_id, self.device, self.ahead = stream, grad_accum, pad_id, device, ahead
        self._queue: list[StepBatches] = []
        # (step, summed loss on the device, total, gradient norm or None)
        self._trained: list[tuple[int, object, float, object]] = []
        self._metrics: dict[int, dict[str, float]] = {}

    def next(self, remaining: int) -> StepBatches:
        """The next step's batches, read with the next min(ahead, remaining) steps' when none
        are left (every rank passes the same `remaining`: the steps left in the run)."""
        self.read(remaining)
        return self._queue.pop(0)

    def read(self, remaining: int) -> None:
        """Read the next min(ahead, remaining) steps' batches, unless some are still unused."""
        if not self._queue:
            steps = []
            for _ in range(max(1, min(self.ahead, remaining))):
                examples = [next(self.stream) for _ in range(self.grad_accum)]
                batches = [collate(b, self.pad_id) for b in examples]
                steps.append((batches, [trained_tokens(b["labels"]) for b in batches],
                              sum(len(e.input_ids) for b in examples for e in b),
                              sum(b["input_ids"].numel() for b in batches)))
            sums = self._reduce([float(sum(c)) for _, c, _, _ in steps] + [float(t) for _, _, t, _ in steps])
            self._queue = [StepBatches(b, c, total, tokens, t, slots)
                           for (b, c, t, slots), total, tokens in zip(steps, sums, sums[len(steps):])]

    def trained(self, step: int, loss_sum, total: float, grad_norm=None) -> None:
        """Step `step` summed `loss_sum` (a 0-d tensor on the device) over its trained tokens on this
        rank. `grad_norm`: the norm of the step's gradients before clipping, over every rank's (as
        DeepSpeed computes it), a number or a 0-d tensor on the device; None where none was computed."""
        self._trained.append((step, loss_sum, total, grad_norm))

    def settle(self) -> None:
        """Sum the losses not yet summed over the ranks now (every rank calls it at the same step)."""
        if self._trained:
            self._reduce([])

    def step_metrics(self) -> dict[int, dict[str, float]]:
        """The steps settled since the last call, by step: {"train_loss": its loss over every rank's
        trained tokens}, with "grad_norm" where the step has one."""
        done, self._metrics = self._metrics, {}
        return done

    def _reduce(self, numbers: list[float]) -> list[float]:
        """`numbers` and the pending losses summed over the ranks in one all-reduce: the numbers' sums."""
        import torch

        trained, self._trained = self._trained, []
        values = torch.tensor(numbers, dtype=torch.float64, device=self.device)
        if trained:
            values = torch.cat([values, torch.stack([loss for _, loss, _, _ in trained])])
        sums = all_reduce_sum(values, self.device) if values.numel() else []
        for (step, _, total, norm), loss in zip(trained, sums[len(numbers):]):
            self._metrics[step] = {"train_loss": loss / max(total, 1.0)}
            if norm is not None:  # read after the all-reduce's results: the device has long computed it
                self._metrics[step]["grad_norm"] = float(norm)
        return sums[:len(numbers)]


class TrainedPositionsLoss:
    """A causal LM's loss on a batch with its output layer run on the trained positions only.

    The output layer turns every position's hidden state into a row of vocabulary logits, and the
    model's loss then drops the positions whose label is masked: the prompt and the padding, 60% of
    the benchmark jobs' positions. Here a forward pre-hook on the output layer keeps the rows of
    the trained positions before it runs, so the logits, their fp32 copy in the loss and the
    backward through them cover those alone: the same loss and gradients for less time (7-9% of a
    step on the benchmark jobs, docs/benchmarks.md) and, on a large vocabulary, far less memory.

    Evaluation takes the same rows (`logits`), so its logits are those of the trained positions too.
    Every position's logits are computed where the rows cannot be taken in the output layer: no
    output layer found (`get_output_embeddings`), or a first batch whose logits do not come back as
    one row per trained position (an output layer called elsewhere, logits reshaped after it). A
    mixture of experts that adds its router loss (which the model adds only when given the labels)
    trains on the model's own loss."""

    def __init__(self, model):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # A mixture of experts' router loss is added to the loss by the model, and only when it is
        # given the labels: such a model trains on its own loss (evaluation takes the rows still).
        self._router_loss = bool(getattr(getattr(model, "config", None), "output_router_logits", False))
        self.enabled = head is not None
        self._where = None  # the next forward's trained positions (rows, columns, width), taken by the hook
        self._checked = False
        self._hook = head.register_forward_pre_hook(self._keep_trained_rows) if self.enabled else None

    def _keep_trained_rows(self, module, args):
        where, self._where = self._where, None
        hidden = args[0]
        if where is None or hidden.dim() != 3 or hidden.size(1) < where[2]:
            return None  # evaluation, generation: every position
        rows, columns, width = where
        extra = hidden.size(1) - width  # prompt tuning's virtual tokens come first
        flat = hidden.reshape(-1, hidden.size(-1))
        index = (rows * hidden.size(1) + extra + columns).to(hidden.device)  # a model split over GPUs
        return (flat.index_select(0, index), *args[1:])

    def logits(self, engine, batch: dict, device):
        """The logits of `batch`'s trained positions, (N, vocabulary), and their labels, (N,):
        `batch` collated on the host, moved to `device` here. The positions are found on the host,
        so a GPU step waits for nothing. Without the hook, every position's logits are computed
        and the trained rows taken from them."""
        import torch.nn.functional as F

        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position i predicts label i + 1
        rows, columns = (targets != IGNORE_INDEX).nonzero().unbind(1)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        moved = to_device({**inputs, "rows": rows, "columns": columns, "kept": targets[rows, columns]}, device)
        rows, columns, kept = (moved.pop(k) for k in ("rows", "columns", "kept"))
        width = targets.size(1)
        if self.enabled:
            self._where = (rows, columns, width)
            if self._checked:
                return engine(**moved).logits, kept
            try:  # the first batch finds out whether the model's output layer takes the rows
                logits = engine(**moved).logits
                # One row per trained position: the hook took them. Without it the logits are
                # (batch, length, vocabulary), or batch x length rows: more than N.
                fits = logits.dim() == 2 and logits.size(0) == kept.numel()
            except Exception:  # e.g. logits reshaped to (batch, length, vocab) after the layer
                fits = False
            self._where, self._checked = None, True
            if fits:
                return logits, kept
            self.close()
            module = getattr(engine, "module", engine)
            logging.getLogger(__name__).warning(
                "model type %s does not take rows of hidden states in its output layer: every position's "
                "logits are computed", getattr(getattr(module, "config", None), "model_type", type(module).__name__))
        logits = engine(**moved).logits[:, -width:]  # prompt tuning's virtual tokens come first
        return logits[rows.to(logits.device), columns.to(logits.device)], kept

    def __call__(self, engine, batch: dict, device):
        """The mean loss over the trained positions of `batch` (collated on the host): a 0-d
        tensor, 0 when it has none; the model's own loss where its router loss belongs in it."""
        import torch.nn.functional as F

        if self._router_loss:
            return self._model_loss(engine, batch, device)
        logits, kept = self.logits(engine, batch, device)
        return F.cross_entropy(logits.float(), kept.to(logits.device), reduction="sum") / max(kept.numel(), 1)

    def close(self) -> None:
        """Take the hook off the model: every position's logits from here on."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _model_loss(engine, batch: dict, device):
        return engine(**to_device(batch, device)).loss


def train_step(engine, feed: StepFeed, step: int, remaining: int, device, world: int = 1,
               loss_of: TrainedPositionsLoss | None = None) -> dict:
    """One optimizer step over the feed's next `grad_accum` micro batches, each one's loss
    `loss_of(engine, batch, device)` (default: the model's own). The loss is weighted by
    token: the step's trained tokens on all ranks (T, summed ahead by the feed) weigh equally, as
    one mean over all of them. DeepSpeed divides each micro batch's loss by grad_accum and
    averages the gradients over ranks, so micro batch b's mean loss over its n_b tokens is scaled
    by n_b x grad_accum x world / T: the gradients sum to d(sum of token losses / T). The summed
    loss stays on the device; the feed sums it over the ranks later (`StepFeed.step_metrics`), with
    the step's gradient norm where DeepSpeed computed one (`engine.get_global_grad_norm()`)."""
    import torch

    start = time.perf_counter()
    engine.train()
    batch_set = feed.next(remaining)
    total, grad_accum = batch_set.total, len(batch_set.batches)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_of = loss_of or TrainedPositionsLoss._model_loss
    for batch, n in zip(batch_set.batches, batch_set.counts):
        loss = loss_of(engine, batch, device)
        loss = torch.nan_to_num(loss) if n == 0 else loss  # a micro batch with no trained token adds 0
        engine.backward(loss * (n * grad_accum * world / max(total, 1.0)))
        engine.step()
        loss_sum += loss.detach().double() * n
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    feed.trained(step, loss_sum, total, norm)
    elapsed = time.perf_counter() - start
    return {"learning_rate": engine.get_lr()[0], "tokens_per_s": batch_set.tokens / elapsed, "step_time_s": elapsed,
            "real_token_share": batch_set.local_tokens / max(batch_set.slots, 1)}  # rank 0's: real / (rows x width)


def chunked_loss_sum(logits, labels, chunk_rows: int):
    """Sum of the cross-entropy of `logits` rows (N, vocabulary) against `labels` (N,), `chunk_rows`
    rows at a time in fp32 (never an fp32 copy of them all)."""
    import torch
    import torch.nn.functional as F

    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, labels.numel(), chunk_rows):
        total += F.cross_entropy(logits[i:i + chunk_rows].float(), labels[i:i + chunk_rows], reduction="sum").double()
    return total


def evaluate_batches(engine, batches, pad_id: int, device, scorer: TrainedPositionsLoss) -> float:
    """Mean loss per trained token over (examples, weight) batches, all ranks together, the logits
    of the trained positions only (`scorer`): one transfer to the host at the end."""
    import torch

    from orchestrator.planning.memory import EVAL_LOSS_CHUNK_TOKENS

    if not batches:
        return float("nan")
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0.0
    with torch.no_grad():
        for batch_examples, weight in batches:
            logits, labels = scorer.logits(engine, collate(batch_examples, pad_id), device)
            # The logits are on the output layer's device (the last one of a model split over GPUs).
            summed = chunked_loss_sum(logits, labels.to(logits.device), EVAL_LOSS_CHUNK_TOKENS)
            loss_sum += weight * summed.to(device)
            count += weight * labels.numel()
    total, n = all_reduce_sum([loss_sum, count], device)
    return total / max(n, 1.0)


def evaluate(model, examples: list[Example], size: int, pad_id: int, rank: int, world: int,
             device, cap: int | None = None) -> float:
    """Mean loss per trained token over a list of examples (all ranks together)."""
    with TrainedPositionsLoss(model) as scorer:
        return evaluate_batches(model, eval_batches(examples, size, rank, world, cap), pad_id, device, scorer)


def peak_memory_bytes(use_gpu: bool) -> int:
    """This process's peak memory: on a GPU the most CUDA memory torch allocated; on the CPU the
    peak resident set size of the worker process (Linux reports ru_maxrss in KiB)."""
    import resource

    import torch

    if use_gpu:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
