"""The worker's arithmetic on the tiny base, in one process: the train loss is weighted by token
across micro batches, and the chunked evaluation loss equals the plain one."""

from __future__ import annotations

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

    from orchestrator.training.steps import train_step

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

    metrics = train_step(GradAccumulatingEngine(model, 2), iter([[long], [short]]), 2, 0, torch.device("cpu"))
    assert metrics["train_loss"] == pytest.approx(by_token.item(), rel=1e-5)
    mean_of_means = (token_losses[0].mean() + token_losses[1].mean()).item() / 2
    assert abs(metrics["train_loss"] - mean_of_means) > 1e-3  # the two bases differ on this batch
    for got, want in zip((p.grad for p in model.parameters()), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_chunked_evaluation_loss_equals_the_full_fp32_one(model):
    import torch
    import torch.nn.functional as F

    from orchestrator.data.tokenize import collate
    from orchestrator.training.steps import chunked_token_loss_sum, evaluate

    examples = [_example(5, 30, 0), _example(3, 7, 300), _example(8, 12, 600)]
    batch = collate(examples, 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    full = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    for chunk in (1, 7, 4096):
        total, n = chunked_token_loss_sum(logits, batch["labels"], chunk)
        assert n == int((labels != IGNORE_INDEX).sum()) and total.item() == pytest.approx(full.item(), rel=1e-6)
    assert evaluate(model, examples, 2, 0, 0, 1, torch.device("cpu")) == pytest.approx(full.item() / n, rel=1e-5)
