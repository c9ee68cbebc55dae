"""The worker's arithmetic on the tiny base, in one process: the train loss is weighted by token
across micro batches, and the chunked evaluation loss equals the plain one."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.data.records import IGNORE_INDEX, Example


class GradAccumulatingEngine:
    """What `train_step` uses of a DeepSpeed engine, as DeepSpeed defines it for one rank:
    `backward` divides the loss by gradient_accumulation_steps before backpropagating, `step`
    applies the update only at the accumulation boundary (here: never, the test reads the grads)."""

    def __init__(self, model, grad_accum: int):
        self.module, self.grad_accum = model, grad_accum

    def __call__(self, **batch):
        return self.module(**batch)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def step(self):
        pass

    def get_lr(self):
        return [0.0]


@pytest.fixture(scope="module")
def model(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)


def _example(prompt: int, answer: int, offset: int) -> Example:
    ids = [(offset + i) % 900 + 50 for i in range(prompt + answer)]
    return Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:])


def test_train_loss_is_the_mean_over_every_trained_token_of_the_step(model):
    """Two micro batches, one long answer (40 tokens) and one short (3): the step's loss and
    gradient are those of the mean over all 43 tokens, not the mean of the two micro batches' means."""
    import torch
    import torch.nn.functional as F

    from orchestrator.training.steps import StepFeed, TrainedPositionsLoss, train_step

    long, short = _example(6, 40, 0), _example(6, 3, 500)
    token_losses = []
    for e in (long, short):
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        labels = torch.tensor(e.labels[1:])
        losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        token_losses.append(losses[labels != IGNORE_INDEX])
    assert [len(t) for t in token_losses] == [40, 3]
    by_token = torch.cat(token_losses).mean()  # the hand-computed value: sum over 43 tokens / 43
    model.zero_grad()
    by_token.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    mean_of_means = (token_losses[0].mean() + token_losses[1].mean()).item() / 2
    # Both losses: the model's own (every position's logits) and the worker's (the output layer on
    # the trained positions only: 40 rows, then 3, of 45 and 8 positions).
    rows = []
    seen = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    loss_of = TrainedPositionsLoss(model)
    try:
        for scored in (None, loss_of):
            feed = StepFeed(iter([[long], [short]]), 2, 0, torch.device("cpu"))
            train_step(GradAccumulatingEngine(model, 2), feed, 1, 1, torch.device("cpu"), loss_of=scored)
            assert feed.step_metrics() == {}  # summed over the ranks at the next read, or when settled
            feed.settle()
            [(step, known)] = feed.step_metrics().items()
            assert step == 1 and set(known) == {"train_loss"}  # this engine computes no gradient norm
            train_loss = known["train_loss"]
            assert train_loss == pytest.approx(by_token.item(), rel=1e-5)
            assert abs(train_loss - mean_of_means) > 1e-3  # the two bases differ on this batch
            for got, want in zip((p.grad for p in model.parameters()), expected_grads):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            model.zero_grad()
        assert loss_of.enabled
    finally:
        seen.remove()
        loss_of.close()
    assert [tuple(r) for r in rows] == [(1, 46), (1, 9), (40,), (3,)]


def test_prompt_tuning_scores_only_its_trained_positions_after_its_virtual_tokens(tiny_base):
    """Prompt tuning puts its virtual tokens' hidden states before the batch's: the rows kept for
    the output layer are found after them, and the loss is the model's own (given the labels)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.data.tokenize import collate
    from orchestrator.training.steps import TrainedPositionsLoss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    batch = collate([_example(5, 30, 0), _example(3, 7, 300)], 0)
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    want = model(**batch).loss
    loss_of = TrainedPositionsLoss(model)
    got = loss_of(model, batch, torch.device("cpu"))
    assert loss_of.enabled and rows[1] == (37, 128)  # 30 + 7 trained positions, not 2 x (5 + 35)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _ReshapingLM:
    """A causal LM whose forward reshapes its logits to (batch, length, vocab) after its output
    layer: the rows-only path cannot hold, and the first batch finds that out."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def __call__(self, input_ids, attention_mask, labels=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.logits = out.logits.view(*input_ids.shape, -1)
        return out


def test_a_model_whose_logits_do_not_come_back_as_rows_keeps_its_own_loss(model):
    import torch

    from orchestrator.data.tokenize import collate
    from orchestrator.training.steps import TrainedPositionsLoss

    lm = _ReshapingLM(model)
    batch = collate([_example(5, 30, 0), _example(3, 7, 300)], 0)
    loss_of = TrainedPositionsLoss(lm)
    assert loss_of.enabled
    first = loss_of(lm, batch, torch.device("cpu"))
    assert not loss_of.enabled and not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone
    torch.testing.assert_close(first, model(**batch).loss)
    torch.testing.assert_close(loss_of(lm, batch, torch.device("cpu")), first)


def test_chunked_evaluation_loss_equals_the_full_fp32_one(model):
    """Evaluation's loss (the trained positions' logits, an fp32 chunk of rows at a time) equals
    the plain fp32 cross-entropy over every position's logits, whatever the chunk."""
    import torch
    import torch.nn.functional as F

    from orchestrator.data.tokenize import collate
    from orchestrator.training.steps import TrainedPositionsLoss, chunked_loss_sum, evaluate

    examples = [_example(5, 30, 0), _example(3, 7, 300), _example(8, 12, 600)]
    batch = collate(examples, 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    full = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    with TrainedPositionsLoss(model) as scorer, torch.no_grad():
        rows, kept = scorer.logits(model, batch, torch.device("cpu"))
    assert rows.shape == (49, logits.size(-1)) and kept.numel() == int((labels != IGNORE_INDEX).sum())
    for chunk in (1, 7, 4096):
        assert chunked_loss_sum(rows, kept, chunk).item() == pytest.approx(full.item(), rel=1e-6)
    assert evaluate(model, examples, 2, 0, 0, 1, torch.device("cpu")) == pytest.approx(full.item() / 49, rel=1e-5)
    assert not model.get_output_embeddings()._forward_pre_hooks  # evaluate took its hook off again


def _per_example_logits(model, examples, packed: bool):
    import torch

    from orchestrator.data.tokenize import collate, pack_examples

    with torch.no_grad():
        if not packed:
            return [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
        [row] = list(pack_examples(examples, sum(len(e.input_ids) for e in examples)))
        batch = collate([row], 0)
        assert "attention_mask" not in batch  # the position ids alone confine attention
        # Without a cache, as in training (the worker turns use_cache off).
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        bounds = list(itertools.accumulate(len(e.input_ids) for e in examples))
        return [logits[b - len(e.input_ids):b] for e, b in zip(examples, bounds)]


def test_packed_examples_score_as_they_do_alone_and_never_see_each_other(model):
    """Three examples packed into one row: each one's logits (hence its loss) equal those it gets
    alone; changing the middle example leaves the other two's logits unchanged."""
    import torch

    examples = [_example(5, 20, 0), _example(3, 7, 300), _example(8, 12, 600)]
    alone, packed = _per_example_logits(model, examples, False), _per_example_logits(model, examples, True)
    for a, p in zip(alone, packed):
        torch.testing.assert_close(p, a, rtol=1e-4, atol=1e-4)
    changed = _per_example_logits(model, [examples[0], _example(3, 7, 777), examples[2]], True)
    torch.testing.assert_close(changed[0], packed[0], rtol=0, atol=0)
    torch.testing.assert_close(changed[2], packed[2], rtol=0, atol=0)
    assert not torch.equal(changed[1], packed[1])


def test_packed_rows_mask_each_examples_first_label_and_keep_their_examples_in_order():
    from orchestrator.data.tokenize import pack_examples

    examples = [_example(2, 3, i * 10) for i in range(5)]  # 5 tokens each
    rows = list(pack_examples(iter(examples), 12))
    assert [len(r.input_ids) for r in rows] == [10, 10, 5]
    assert rows[0].position_ids == [0, 1, 2, 3, 4] * 2
    assert rows[0].labels[5] == IGNORE_INDEX and rows[0].input_ids[5:] == examples[1].input_ids


def test_packing_fits_each_window_first_fit_decreasing():
    """Lengths 5, 4, 3, 4 into rows of 8: packed in order they need 3 rows (5 | 4 3 | 4); first
    fit decreasing needs 2 (5 3 | 4 4), each row's examples in stream order. Windows are packed
    separately, and every example lands in exactly one row."""
    from orchestrator.data.tokenize import pack_examples

    lengths = [5, 4, 3, 4]
    examples = [_example(1, n - 1, 100 * i) for i, n in enumerate(lengths)]
    rows = list(pack_examples(examples, 8))
    assert [r.input_ids for r in rows] == [examples[0].input_ids + examples[2].input_ids,
                                           examples[1].input_ids + examples[3].input_ids]
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    # Window 2: (5, 4) and (3, 4) are packed apart: 5 | 4 | 3 4.
    assert [len(r.input_ids) for r in pack_examples(examples, 8, window=2)] == [5, 4, 7]
    many = [_example(1, i % 7 + 1, 10 * i) for i in range(100)]
    packed = list(pack_examples(many, 16, window=32))
    assert sorted(x for r in packed for x in r.input_ids) == sorted(x for e in many for x in e.input_ids)
    assert all(len(r.input_ids) <= 16 for r in packed)


@pytest.mark.parametrize("start", [0, 1, 5, 9])
def test_packed_micro_batches_resume_exactly_where_they_stopped(start):
    from orchestrator.training.steps import packed_micro_batches

    examples = [_example(1, i % 5 + 1, i) for i in range(11)]  # 2 to 6 tokens each
    one_pass = lambda: iter(examples)  # noqa: E731
    for rank in (0, 1):
        batches = lambda start=0: packed_micro_batches(one_pass, 2, rank, 2, 3, 8, start=start, window=4)  # noqa: E731
        uninterrupted = [[r.input_ids for r in b] for b in itertools.islice(batches(), start, start + 5)]
        assert [[r.input_ids for r in b] for b in itertools.islice(batches(start), 5)] == uninterrupted


def _feed_on_rank(rank: int, world: int, port: int, results) -> None:
    """Rank `rank` of a gloo group: 7 steps through a StepFeed reading 4 ahead, each step's
    'loss' a known number; what it saw, and the size of each all-reduce it made."""
    import torch
    import torch.distributed as dist

    from orchestrator.training.steps import StepFeed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sizes, all_reduce = [], dist.all_reduce

    def counted(tensor, *args, **kwargs):  # the real collective, its size noted
        sizes.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counted
    # Step i's micro batch on rank r: one example of 2 prompt and 2 + r + i answer tokens.
    stream = iter([[_example(2, 2 + rank + i, 10 * i)] for i in range(1, 11)])
    feed, seen, losses = StepFeed(stream, 1, 0, torch.device("cpu"), ahead=4), {}, {}
    for step in range(1, 8):
        batches = feed.next(remaining=8 - step)
        seen[step] = (batches.counts, batches.total, batches.tokens, batches.local_tokens)
        # A gradient norm on odd steps, a 0-d tensor or a number (as DeepSpeed's engines keep it).
        norm = (torch.tensor(0.5 * step) if step % 3 else 0.5 * step) if step % 2 else None
        feed.trained(step, torch.tensor(float(step * (rank + 1)), dtype=torch.float64), batches.total, norm)
        losses[step] = feed.step_metrics()
    feed.settle()
    losses["settled"] = feed.step_metrics()
    dist.destroy_process_group()
    results.put((rank, sizes, seen, losses))


def test_the_step_feed_sums_a_window_of_steps_and_their_losses_in_one_all_reduce():
    """Two gloo ranks, 7 steps read 4 ahead: one all-reduce per read (the 4 steps' trained and
    real token counts, plus the losses of the steps trained since the read before) and one to
    settle the rest. Each step's total is both ranks' trained tokens, and each loss is the two
    ranks' summed loss over that total, known at the next read, with the step's gradient norm
    where it has one (never part of the all-reduce: every rank's is the same, the global one)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_feed_on_rank, args=(rank, 2, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict((r[0], r[1:]) for r in (results.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    for rank, (sizes, seen, losses) in got.items():
        # Steps 1-4 (4 + 4 counts), steps 5-7 (3 + 3, and steps 1-4's losses), then 5-7's losses.
        assert sizes == [8, 10, 3]
        for step in range(1, 8):
            answer = 2 + rank + step  # every answer token is trained (the label of position 0 never is)
            total = (2 + step) + (3 + step)  # both ranks'
            assert seen[step] == ([answer], total, total + 2 * 2, answer + 2)
        loss = {s: 3 * s / ((2 + s) + (3 + s)) for s in range(1, 8)}  # (s x 1 + s x 2) / total
        known = {s: {"train_loss": loss[s], **({"grad_norm": 0.5 * s} if s % 2 else {})} for s in range(1, 8)}
        assert losses[1] == losses[2] == losses[3] == losses[4] == {}
        assert losses[5].keys() == {1, 2, 3, 4} and losses["settled"].keys() == {5, 6, 7}
        for s in range(1, 8):
            assert losses[5 if s < 5 else "settled"][s] == pytest.approx(known[s], rel=1e-12)
        assert losses[6] == losses[7] == {}


def _grad_norm_rank(rank: int, world: int, port: int, specs: dict, out_dir: str) -> None:
    """One gloo rank: each spec's engine as the worker builds it (`setup_engine`), one step of two
    examples through `train_step`, against the norm of the same step's gradients on a copy of the
    model taken before it."""
    import copy
    import json
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    from memory_probe import _deepspeed_config, _join_as_a_cpu_worker
    from orchestrator.spec import JobSpec
    from orchestrator.training.steps import StepFeed, TrainedPositionsLoss, train_step
    from orchestrator.training.worker import setup_engine

    _join_as_a_cpu_worker(rank, world, port)
    cpu, results = torch.device("cpu"), {}
    for name, dump in specs.items():
        spec = JobSpec.model_validate(dump)
        torch.manual_seed(0)
        engine = setup_engine(spec, SimpleNamespace(use_gpu=False, deepspeed_config=_deepspeed_config(spec, world, 2)),
                              cpu)
        examples = [_example(5, 30, 0), _example(9, 12, 300)]
        twin = copy.deepcopy(engine.module)
        twin.train()
        with TrainedPositionsLoss(twin) as twin_loss:
            twin_loss(twin, StepFeed(iter([examples]), 1, 0, cpu).next(1).batches[0], cpu).backward()
        want = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in twin.parameters()
                                                     if p.grad is not None])).item()
        feed = StepFeed(iter([examples]), 1, 0, cpu)
        train_step(engine, feed, 1, 1, cpu, world, TrainedPositionsLoss(engine.module))
        feed.settle()
        results[name] = {"want": want, "got": feed.step_metrics()[1].get("grad_norm")}
    Path(out_dir, "grad_norms.json").write_text(json.dumps(results))


def test_every_engine_logs_its_steps_gradient_norm_before_clipping(tiny_base, tmp_path):
    """fp32 without ZeRO (DeepSpeed drops the norm it clips with: `keep_fp32_grad_norm` keeps it)
    and bf16 ZeRO-2 (DeepSpeed keeps its own): the step's `grad_norm` is the norm of the step's
    gradients, taken before clipping (`max_grad_norm` here far below it), as HF Trainer logs it."""
    import json

    from memory_probe import spawn_ranks
    from orchestrator.spec import parse_spec

    def spec(dtype: str, stage: int) -> dict:
        return parse_spec({
            "name": "norm", "model": {"base": str(tiny_base), "dtype": dtype}, "quantization": {"bits": None},
            "peft": {"method": "lora", "r": 8, "dropout": 0.0}, "data": {"train": "unused.jsonl", "max_seq_len": 64},
            "training": {"max_steps": 2, "micro_batch_size": 2, "max_grad_norm": 1e-4},
            "distributed": {"num_workers": 1, "deepspeed": {"stage": stage}}}).model_dump()

    spawn_ranks(_grad_norm_rank, 1, {"fp32-z0": spec("float32", 0), "bf16-z2": spec("bfloat16", 2)}, str(tmp_path))
    norms = json.loads((tmp_path / "grad_norms.json").read_text())
    for name, rel in (("fp32-z0", 1e-5), ("bf16-z2", 1e-2)):  # bf16: the twin's norm is of bf16 gradients
        got, want = norms[name]["got"], norms[name]["want"]
        assert got is not None and want > 100 * 1e-4, norms  # clipped: the norm before clipping, not 1e-4
        assert got == pytest.approx(want, rel=rel), norms
