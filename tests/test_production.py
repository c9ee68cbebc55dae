"""From candidate to production on real runs: two adapters of the built-in base registered under
one name (2 steps: worse; LATER_STEPS steps: better), evaluated beyond loss, compared side by side, and
promoted only on the evidence of an evaluation; every move recorded."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from orchestrator.spec import load_spec

from conftest import REPO, free_port

EVAL = REPO / "jobs" / "data" / "quickstart" / "eval.jsonl"
NAME = "prod"
FEW = ["--max-examples", "6", "--max-new-tokens", "24"]  # cheap: 6 examples, 24 new tokens each


# Steps of version 2. The tests tell the two versions apart by their greedy answers and logits.
# With 12 steps they passed in CI, yet on a fresh machine (its built-in base pre-trained there)
# both versions answered "It is an animal." and their logits differed by 0.42 against a bound of
# 0.59; with 40, version 2 answers in the data's pattern ("It is a wolf. It lives in the forest.
# ...") and the logits differ by 3.9 against 0.69 (measured 2026-12-07).
LATER_STEPS = 40


@pytest.fixture(scope="module")
def versions(tmp_path_factory, ray_local, tiny_base):
    """models:/prod/1 trained 2 steps, models:/prod/2 trained LATER_STEPS (@candidate), one tracking
    store; each run's `registry.promote` gate (eval_loss on 6 examples) applied as `orchestrator
    run` applies it: version 1 takes production unopposed, version 2 wins it on evidence."""
    from orchestrator.evaluation.gate import promote_after_run
    from orchestrator.training.recipe import run_job

    tmp = tmp_path_factory.mktemp("production")
    summaries, gates = [], []
    for steps in (2, LATER_STEPS):
        sets = {"name": NAME, "registry.name": NAME, "tracking.experiment": NAME,
                "tracking.uri": f"sqlite:///{tmp}/mlflow.db", "storage.path": str(tmp / "runs"),
                "training.max_steps": steps, "training.eval_every": steps, "registry.promote.alias": "production",
                "registry.promote.max_examples": 6, "registry.promote.max_new_tokens": 0}
        spec = load_spec(REPO / "jobs" / "quickstart.yaml", [f"{k}={v}" for k, v in sets.items()])
        summaries.append(run_job(spec))
        gates.append(promote_after_run(spec, summaries[-1].registered_model, summaries[-1].tracking_uri))
    assert [s.registered_model["version"] for s in summaries] == ["1", "2"]
    return {"uri": summaries[0].tracking_uri, "tmp": tmp, "summaries": summaries, "gates": gates}


def cli(*args, code: int = 0) -> str:
    """stdout and stderr together (what a person reads)."""
    from orchestrator.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def cli_json(*args, code: int = 0):
    """The --json object a command printed on stdout."""
    from orchestrator.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout)


def evaluation_runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(NAME)
    return client.search_runs([experiment.experiment_id], "tags.`orchestrator.kind` = 'evaluation'")


def test_evaluate_against_side_by_side(versions):
    """Both versions on the same examples: the longer-trained adapter has the lower loss and a higher
    ROUGE-L; every metric is reported for both with its difference, every example with both
    outputs; the run, its table and the versions' eval tags are in MLflow."""
    from mlflow import MlflowClient

    from orchestrator.tracking.evaluations import EVAL_TABLE, read_table

    uri = versions["uri"]
    out = cli_json("evaluate", f"models:/{NAME}/2", "--against", f"models:/{NAME}/1", "--data", EVAL,
                   "--tracking-uri", uri, *FEW)
    better, worse = out["models"][f"models:/{NAME}/2"], out["models"][f"models:/{NAME}/1"]
    assert set(better) == {"eval_loss", "perplexity", "exact_match", "rougeL", "chrf", "bleu"}
    assert better["eval_loss"] < worse["eval_loss"] and better["rougeL"] > worse["rougeL"]
    assert math.isclose(better["perplexity"], math.exp(better["eval_loss"]), rel_tol=1e-9)
    assert out["comparison"]["eval_loss"]["difference"] == pytest.approx(better["eval_loss"] - worse["eval_loss"])
    assert out["comparison"]["eval_loss"]["not_worse"] and not out["comparison"]["eval_loss"]["difference"] > 0
    assert len(out["rows"]) == 6 and all(r[f"output models:/{NAME}/2"] for r in out["rows"])

    client = MlflowClient(uri)
    run = client.get_run(out["run_id"])
    assert run.data.tags["eval.version.0"] == f"models:/{NAME}/2" and run.data.tags["eval.version.1"] == f"models:/{NAME}/1"
    assert run.data.metrics["eval_loss"] == pytest.approx(better["eval_loss"])
    assert run.data.metrics["against.eval_loss"] == pytest.approx(worse["eval_loss"])
    table = read_table(uri, out["run_id"], EVAL_TABLE)
    assert [r["prompt"] for r in table] == [r["prompt"] for r in out["rows"]]
    assert {"reference", f"output models:/{NAME}/2", f"output models:/{NAME}/1"} <= set(table[0])
    tags = client.get_model_version(NAME, "2").tags
    assert tags["eval.run_id"] == out["run_id"] and float(tags["eval.rougeL"]) == pytest.approx(better["rougeL"], rel=1e-4)


def test_evaluate_loss_is_the_training_eval_loss(versions):
    """The evaluation's loss reuses the training's tokenization, masking and token weighting: on the
    examples the run evaluated (its eval_batches cap: 8 batches x 8 examples x 2 workers = the first
    128), it equals the run's final eval_loss within 1%: the run evaluated the LoRA weights as
    DeepSpeed's bf16 engine holds them, the registered adapter loads them in float32 (measured:
    2.5826 against 2.5975, 0.6%)."""
    summary = versions["summaries"][1]
    out = cli_json("evaluate", f"models:/{NAME}/2", "--max-examples", "128", "--max-new-tokens", "0",
                   "--tracking-uri", versions["uri"])
    assert out["data"].endswith("eval.jsonl") and out["examples"] == 128
    assert out["models"][f"models:/{NAME}/2"]["eval_loss"] == pytest.approx(summary.metrics["eval_loss"], rel=0.01)


def test_training_logs_generations_at_each_evaluation(versions):
    """The run's generations table: the same 3 eval prompts completed at each evaluation (the base
    at step 0, the adapter at step LATER_STEPS), each row with its step, prompt, reference and output."""
    from orchestrator.data.records import read_jsonl
    from orchestrator.tracking.evaluations import GENERATIONS_TABLE, read_table

    summary = versions["summaries"][1]
    rows = read_table(versions["uri"], summary.run_id, GENERATIONS_TABLE)
    first = [r for _, r in read_jsonl(EVAL)[:3]]
    assert [(r["step"], r["prompt"], r["reference"]) for r in rows] == [
        (step, f"{x['instruction']}\n{x['input']}", x["output"]) for step in (0, LATER_STEPS) for x in first]
    assert all(r["output"] for r in rows)
    assert [r["output"] for r in rows[:3]] != [r["output"] for r in rows[3:]]  # the adapter changed the answers


def test_a_run_promotes_itself_only_on_evidence(versions):
    """registry.promote: the first run finds production pointing nowhere and takes it without a
    comparison; the second is evaluated against it and takes it on the evaluation's evidence."""
    from mlflow import MlflowClient

    first, second = versions["gates"]
    assert first.promoted and first.incumbent is None and first.evaluation is None
    assert second.promoted and second.incumbent == "1" and second.candidate_value < second.incumbent_value
    move = json.loads(MlflowClient(versions["uri"]).get_model_version(NAME, "2").tags["promoted.production"])
    assert move["from_version"] == "1" and move["evidence_run_id"] == second.evaluation.run_id


def test_promotion_gate_moves_the_alias_only_on_evidence(versions):
    """A rollback by hand (production -> 1); the longer-trained version 2 passes the gate and takes
    production back; the 2-step version 1 fails it: exit 1, production stays at 2. Both
    evaluation runs are in MLflow, and every move names who, when, from which version and the
    evidence."""
    from mlflow import MlflowClient

    uri = versions["uri"]
    client = MlflowClient(uri)
    before = len(evaluation_runs(uri))
    cli("registry", "promote", NAME, "1", "--alias", "production", "--tracking-uri", uri)
    gate = ["--alias", "production", "--if-better-than", "production", "--data", EVAL, "--tracking-uri", uri,
            "--max-examples", "6", "--max-new-tokens", "0"]
    passed = cli_json("registry", "promote", NAME, "2", *gate)
    assert passed["promoted"] and passed["previous"] == "1" and passed["incumbent"] == "1"
    assert passed["candidate_value"] < passed["incumbent_value"]
    assert str(client.get_model_version_by_alias(NAME, "production").version) == "2"

    failed = cli_json("registry", "promote", NAME, "1", *gate, code=1)
    assert not failed["promoted"] and failed["incumbent"] == "2"
    assert failed["candidate_value"] > failed["incumbent_value"]
    assert failed["comparison"]["eval_loss"]["not_worse"] is False
    assert str(client.get_model_version_by_alias(NAME, "production").version) == "2"

    runs = evaluation_runs(uri)
    assert len(runs) == before + 2
    assert {passed["evaluation_run_id"], failed["evaluation_run_id"]} <= {r.info.run_id for r in runs}
    move = json.loads(client.get_model_version(NAME, "2").tags["promoted.production"])
    assert move["from_version"] == "1" and move["evidence_run_id"] == passed["evaluation_run_id"]
    assert move["by"] and move["at"].endswith("+00:00")
    history = json.loads(client.get_registered_model(NAME).tags["alias_history.production"])
    assert [(m["version"], m["from_version"], m["evidence_run_id"]) for m in history] == [
        ("1", None, None), ("2", "1", versions["gates"][1].evaluation.run_id), ("1", "2", None),
        ("2", "1", passed["evaluation_run_id"])]


def test_gate_user_errors_exit_2(versions):
    uri = versions["uri"]
    out = cli("registry", "promote", NAME, "2", "--alias", "production", "--if-better-than", "production",
              "--metric", "accuracy", "--tracking-uri", uri, code=2)
    assert "--metric: 'accuracy' is not a metric" in out and "Fix: use one of eval_loss" in out
    out = cli("evaluate", f"models:/{NAME}/2", "--data", "missing.jsonl", "--tracking-uri", uri, code=2)
    assert "--data: file not found: missing.jsonl" in out
    out = cli("serve", f"models:/{NAME}@nowhere", "--tracking-uri", uri, code=2)
    assert out.startswith(f"error: models:/{NAME}@nowhere: ") and "Fix: name a registered version" in out
    out = cli("serve", "--reload", "--port", "1", code=2)
    assert "error: --port: no server answers on http://127.0.0.1:1" in out


# --- serving -------------------------------------------------------------------------------------

PROMPT = "Give a description of this animal.\nThere is a brown wolf at the river."
TOKENS = 16


def post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def post_stream(url: str, body: dict) -> tuple[str, list]:
    """A streamed request's Content-Type and its server-sent events, read as they arrive: each
    `data:` line's JSON, and the final "[DONE]" as the string."""
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        events = [line[len(b"data: "):].decode() for line in response if line.startswith(b"data: ")]
        return response.headers["Content-Type"], [e.strip() if e.strip() == "[DONE]" else json.loads(e) for e in events]


def http_error(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error

    try:
        post(url, body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    raise AssertionError("the request succeeded")


@pytest.fixture(scope="module")
def served(versions):
    """models:/prod/1 and models:/prod@production (version 2) on Ray Serve, one replica; torn down."""
    from orchestrator.serving import deployment

    url = deployment.start([f"models:/{NAME}/1", f"models:/{NAME}@production"], versions["uri"], port=free_port())
    yield url
    deployment.stop()


def generated(uri: str, model: str) -> str:
    """What `orchestrator generate` answers (stdout only)."""
    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["generate", model, PROMPT, "--max-new-tokens", str(TOKENS),
                                      "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_serve_two_adapters_as_generate_answers(versions, served):
    """Each adapter of the one deployment answers completions and chats exactly as `generate`
    answers for its version (train/serve parity); the two answers differ (the adapter is really
    switched per request); an unknown model is a 404 in OpenAI's error shape."""
    from mlflow import MlflowClient

    uri = versions["uri"]
    assert str(MlflowClient(uri).get_model_version_by_alias(NAME, "production").version) == "2"
    listed = json.loads(__import__("urllib.request").request.urlopen(f"{served}/v1/models", timeout=60).read())
    assert {m["id"]: m["version"] for m in listed["data"]} == {f"models:/{NAME}/1": f"models:/{NAME}/1",
                                                               f"models:/{NAME}@production": f"models:/{NAME}/2"}
    answers = {}
    for ref, version in ((f"models:/{NAME}/1", "1"), (f"models:/{NAME}@production", "2")):
        want = generated(uri, f"models:/{NAME}/{version}")
        text = post(f"{served}/v1/completions", {"model": ref, "prompt": PROMPT, "max_tokens": TOKENS})
        chat = post(f"{served}/v1/chat/completions", {"model": ref, "max_tokens": TOKENS,
                                                      "messages": [{"role": "user", "content": PROMPT}]})
        assert text["choices"][0]["text"] == want and text["object"] == "text_completion"
        assert chat["choices"][0]["message"] == {"role": "assistant", "content": want}
        assert 0 < text["usage"]["completion_tokens"] <= TOKENS < text["usage"]["prompt_tokens"]
        assert text["usage"]["total_tokens"] == text["usage"]["prompt_tokens"] + text["usage"]["completion_tokens"]
        answers[version] = want
        assert_streamed_as_answered(served, ref, want, text["usage"])
    assert answers["1"] != answers["2"]
    code, body = http_error(f"{served}/v1/completions", {"model": "models:/nope@x", "prompt": "hi"})
    assert code == 404 and body["error"]["param"] == "model"
    code, body = http_error(f"{served}/v1/completions", {"model": f"models:/{NAME}/1", "prompt": "hi", "stream": "yes"})
    assert code == 400 and body["error"]["param"] == "stream"


def assert_streamed_as_answered(served: str, ref: str, want: str, usage: dict) -> None:
    """`stream: true` sends the same answer in OpenAI's chunks, piece by piece: completions as
    `text_completion` chunks, chats as `chat.completion.chunk` deltas (the first naming the
    assistant), a last chunk with the finish reason, the usage chunk when asked for, then [DONE]."""
    kind, events = post_stream(f"{served}/v1/completions", {"model": ref, "prompt": PROMPT, "max_tokens": TOKENS})
    assert kind.startswith("text/event-stream") and events[-1] == "[DONE]", events
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    pieces = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert "".join(pieces) == want and len(pieces) > 1 and all(pieces), pieces  # streamed, not sent whole
    assert chunks[-1]["choices"][0]["finish_reason"] == ("length" if usage["completion_tokens"] >= TOKENS else "stop")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    kind, events = post_stream(f"{served}/v1/chat/completions", {
        "model": ref, "max_tokens": TOKENS, "messages": [{"role": "user", "content": PROMPT}],
        "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and {c["object"] for c in events[:-1]} == {"chat.completion.chunk"}
    first, *middle, last, with_usage = events[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == want
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] is not None
    assert with_usage["choices"] == [] and with_usage["usage"] == usage
    assert all(c["usage"] is None for c in events[:-2])


def test_serve_samples_and_stops_as_asked(versions, served):
    """`stop` ends the greedy answer before the first stop string (finish_reason "stop"), streamed
    and not; `temperature` with a `seed` samples, the same answer for the same seed, streamed and
    not; options the server does not have are a 400 naming them."""
    ref = f"models:/{NAME}/1"
    ask = {"model": ref, "prompt": PROMPT, "max_tokens": TOKENS}
    want = post(f"{served}/v1/completions", ask)["choices"][0]["text"]
    stop = want.split()[len(want.split()) // 2]
    cut = want[:want.find(stop)].strip()
    stopped = post(f"{served}/v1/completions", {**ask, "stop": [stop, "no such words"]})["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == (cut, "stop") and cut and cut != want, (want, stop)
    _, events = post_stream(f"{served}/v1/completions", {**ask, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    sampled = [post(f"{served}/v1/completions", {**ask, "temperature": 1.5, "seed": 7})["choices"][0]["text"]
               for _ in range(2)]
    _, events = post_stream(f"{served}/v1/completions", {**ask, "temperature": 1.5, "seed": 7})
    assert sampled[0] == sampled[1] == "".join(e["choices"][0]["text"] for e in events[:-1]) and sampled[0]
    for bad, param in (({"n": 2}, "n"), ({"temperature": 3}, "temperature"), ({"logprobs": 2}, "logprobs"),
                       ({"stop": ""}, "stop"), ({"seed": "7"}, "seed")):
        code, body = http_error(f"{served}/v1/completions", {**ask, **bad})
        assert code == 400 and body["error"]["param"] == param, body


def test_serve_completes_concurrent_requests_together(versions, served):
    """Eight non-streamed requests sent at once, four to each served version (two LoRA adapters of
    one base): every one answered (its usage counted); the replica gathered some of them into one
    batched generation (the x-orchestrator-batch-size header says with how many requests an answer
    was completed; both versions' requests may share one), and an answer completed alone is the
    answer that request gets when sent by itself. (A batched answer equals the lone one up to the
    last float bits of the padding's arithmetic: tests/test_registry.py checks complete_many
    against complete_batch.)"""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.serving.deployment import BATCH_HEADER

    prompts = [PROMPT, "There is a cat.", PROMPT + " It is big.", "A small fish in a lake."]
    asks = [{"model": ref, "prompt": p, "max_tokens": 2 * TOKENS}
            for ref in (f"models:/{NAME}/1", f"models:/{NAME}@production") for p in prompts]

    def send(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{served}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return int(response.headers[BATCH_HEADER]), json.loads(response.read())

    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(send, asks))
    assert max(size for size, _ in together) >= 2, [size for size, _ in together]
    for ask, (size, answer) in zip(asks, together):
        assert 1 <= size <= len(asks) and answer["usage"]["prompt_tokens"] > 0, (size, answer)
        if size == 1:
            assert answer["choices"][0]["text"] == send(ask)[1]["choices"][0]["text"], ask


def test_serve_streams_concurrent_requests_together(versions, served):
    """Eight streamed requests sent at once, four to each served version: every one streams a whole
    answer (its usage counted), the replica generated some of them in one batch (the header), and a
    stream generated alone is the answer that request gets unstreamed by itself."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.serving.deployment import BATCH_HEADER

    prompts = [PROMPT, "There is a cat.", PROMPT + " It is big.", "A small fish in a lake."]
    asks = [{"model": ref, "prompt": p, "max_tokens": 2 * TOKENS, "stream_options": {"include_usage": True}}
            for ref in (f"models:/{NAME}/1", f"models:/{NAME}@production") for p in prompts]

    def stream(body: dict) -> tuple[int, str, dict]:
        request = urllib.request.Request(f"{served}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            events = [json.loads(line[len(b"data: "):]) for line in response
                      if line.startswith(b"data: ") and line.strip() != b"data: [DONE]"]
            return (int(response.headers[BATCH_HEADER]), "".join(c["text"] for e in events for c in e["choices"]),
                    events[-1]["usage"])

    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(stream, asks))
    assert max(size for size, _, _ in together) >= 2, [size for size, _, _ in together]
    for ask, (size, text, usage) in zip(asks, together):
        assert 1 <= size <= len(asks) and text and usage["prompt_tokens"] > 0, (size, text, usage)
        if size == 1:
            lone = {k: v for k, v in ask.items() if k != "stream_options"}
            assert text == post(f"{served}/v1/completions", lone)["choices"][0]["text"], ask


def test_serve_follows_alias_moves_on_reload(versions, served):
    """production rolled back to version 1: after a reload the deployment serves version 1 under
    models:/prod@production, with no restart; promoted to 2 again, version 2."""
    from orchestrator.cli import app
    from orchestrator.serving.deployment import reload

    uri = versions["uri"]
    ref = f"models:/{NAME}@production"
    ask = lambda: post(f"{served}/v1/completions", {"model": ref, "prompt": PROMPT, "max_tokens": TOKENS})
    for version in ("1", "2"):
        cli("registry", "promote", NAME, version, "--alias", "production", "--tracking-uri", uri)
        assert reload(served)[ref] == f"models:/{NAME}/{version}"
        answer = ask()
        assert answer["system_fingerprint"] == f"models:/{NAME}/{version}"
        assert answer["choices"][0]["text"] == generated(uri, f"models:/{NAME}/{version}")
    port = served.rsplit(":", 1)[1]
    result = CliRunner().invoke(app, ["serve", "--reload", "--port", port])
    assert result.exit_code == 0 and f"{ref} -> models:/{NAME}/2" in result.output, result.output


def test_requests_to_two_adapters_share_one_batch(versions):
    """Greedy requests to the LoRA adapters of one base are completed in one batch (peft's
    mixed-adapter batches). In one forward pass of the prompt, a row per adapter, each row's logits
    are its own adapter's alone, within a bound from the model's dtype, and the two adapters'
    logits differ by more than twice that bound (so the rows are told apart); `complete_many` runs
    requests to both versions as one batch of the model (its passes see every row at once), and
    each answer names the version that wrote it."""
    import torch

    from orchestrator.models.inference import prompt_ids
    from orchestrator.serving.adapters import ServedAdapters

    refs = [f"models:/{NAME}/1", f"models:/{NAME}/2"]
    adapters = ServedAdapters(refs, versions["uri"])
    adapters.load()
    names = [f"{NAME}/1", f"{NAME}/2"]
    model = adapters.model_of(names[0])
    ids = torch.tensor([prompt_ids(adapters.tokenizer, adapters._prompt(refs[0], PROMPT, None)[2])] * 2)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits[:, -1].float()
        alone = []
        for name in names:
            model.set_adapter(name)
            alone.append(model(input_ids=ids[:1]).logits[0, -1].float())
    # A few roundings of a logit in the compute dtype (bf16: eps 2^-8 x |logit| <= 10).
    tol = 4 * torch.finfo(model.dtype).eps * mixed.abs().max().item()
    assert (alone[0] - alone[1]).abs().max() > 2 * tol, "the two adapters' logits are too close to tell apart"
    for row in range(2):
        assert (mixed[row] - alone[row]).abs().max() <= tol, (row, (mixed[row] - alone[row]).abs().max(), tol)

    rows: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        answers = adapters.complete_many([dict(ref=ref, prompt=p, max_tokens=TOKENS)
                                          for ref in refs for p in (PROMPT, "There is a cat.")])
    finally:
        hook.remove()
    assert rows and set(rows) == {4}, rows
    assert [a.batch_size for a in answers] == [4] * 4 and all(a.text for a in answers), answers
    assert [a.version for a in answers] == [refs[0]] * 2 + [refs[1]] * 2


def test_a_stream_keeps_its_version_through_a_reload(versions):
    """A streamed answer is resolved to its version when it arrives and generated when the replica
    is free: a reload in between (the alias moved) leaves that version loaded for it, so it
    answers whole, as that version; once the stream is gone, the next request unloads it."""
    import gc

    from orchestrator.serving.adapters import ServedAdapters

    uri, ref = versions["uri"], f"models:/{NAME}@production"
    adapters = ServedAdapters([ref], uri)
    assert adapters.load() == {ref: f"models:/{NAME}/2"}
    stream = adapters.stream(ref, PROMPT, max_tokens=TOKENS)
    try:
        cli("registry", "promote", NAME, "1", "--alias", "production", "--tracking-uri", uri)
        assert adapters.load() == {ref: f"models:/{NAME}/1"}
        assert set(adapters.specs) == {f"{NAME}/1", f"{NAME}/2"}, adapters.specs  # 2 kept for the stream
        assert stream.version == f"models:/{NAME}/2"
        assert "".join(stream.pieces) == generated(uri, f"models:/{NAME}/2")
        del stream
        gc.collect()
        assert adapters.complete(ref, PROMPT, max_tokens=TOKENS)[0] == generated(uri, f"models:/{NAME}/1")
        assert set(adapters.specs) == set(adapters.model_of(f"{NAME}/1").peft_config) == {f"{NAME}/1"}, adapters.specs
    finally:
        cli("registry", "promote", NAME, "2", "--alias", "production", "--tracking-uri", uri)


def test_served_adapters_keep_no_download_on_disk(versions, tmp_path, monkeypatch):
    """Serve kills a replica at shutdown (no exit handler runs), so nothing may wait for the
    replica's exit to be cleaned up: each version's download is removed once it is loaded, and
    the adapters answer from memory."""
    import tempfile

    from orchestrator.serving.adapters import ServedAdapters

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    refs = [f"models:/{NAME}/1", f"models:/{NAME}/2"]
    adapters = ServedAdapters(refs, versions["uri"])
    assert adapters.load() == {ref: ref for ref in refs}
    assert not list(tmp_path.iterdir())
    answers = [adapters.complete(ref, PROMPT, max_tokens=TOKENS)[0] for ref in refs]
    assert answers[0] != answers[1] and all(answers), answers
