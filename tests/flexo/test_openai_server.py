"""`flexo serve` over real HTTP: the official OpenAI client, lm-eval's local-completions, bad requests,
a client that disconnects, and interleaved requests with different exclusions."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from flexo.openai_server import create_app, load_engine, serving_in_thread

openai = pytest.importorskip("openai")

PROMPT = "def parse(value):\n    return"


@pytest.fixture(scope="module")
def served(merged):
    engine = load_engine(merged, max_tokens_limit=64)
    with serving_in_thread(create_app(engine)) as url:
        yield engine, url
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0)


def direct(engine, prompt, **options) -> dict:
    """The `done` event of the same request run on the server's model directly (no HTTP, no queue)."""
    ids = prompt if isinstance(prompt, list) else engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    events = list(engine.server.complete(ids, **options))
    return {"events": events, **events[-1]}


def test_openai_client_completes_streams_and_reads_attribution(served, client):
    engine, _ = served
    models = client.models.list().data
    assert [m.id for m in models] == ["merged"] and models[0].model_extra["excludable"] == ["alpha", "beta"]

    r = client.completions.create(model="merged", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"exclude": ["beta"], "attribution": "tokens"})
    want = direct(engine, PROMPT, exclude=["beta"], max_tokens=8)
    choice = r.choices[0]
    assert choice.text == want["text"] and choice.finish_reason == want["finish_reason"]
    # greedy decoding through the KV cache = transformers' own generate (FlexoServer.respond)
    assert choice.text == engine.server.respond(PROMPT, exclude=["beta"], max_new_tokens=8).text
    assert r.model_extra["excluded"] == ["beta"]
    a = choice.model_extra["attribution"]
    assert a["prob_share"]["beta"] == 0.0 and sum(a["prob_share"].values()) == pytest.approx(1.0)
    assert a["prob_share"] == pytest.approx(want["attribution"]["prob_share"], abs=1e-9)
    per_token = a["per_token"]
    assert len(per_token) == r.usage.completion_tokens == 8
    assert "".join(t["text"] for t in per_token) == choice.text
    assert all(t["owner"] in ("public", "alpha") and t["prob_share"]["beta"] == 0.0 for t in per_token)
    assert r.usage.prompt_tokens == len(engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])

    stream = client.completions.create(model="merged", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                       extra_body={"exclude": ["beta"], "attribution": "tokens"})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].model_extra["token_attribution"]["owner"] for c in chunks[:-1]] == \
        [t["owner"] for t in per_token]
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length"
    assert last.model_extra["attribution"]["prob_share"] == pytest.approx(a["prob_share"], abs=1e-12)

    # no attribution unless asked; the same seed samples the same text
    plain = client.completions.create(model="merged", prompt=PROMPT, max_tokens=6, temperature=0.9, top_p=0.8, seed=7)
    again = client.completions.create(model="merged", prompt=PROMPT, max_tokens=6, temperature=0.9, top_p=0.8, seed=7)
    assert "attribution" not in (plain.choices[0].model_extra or {})
    assert plain.choices[0].text == again.choices[0].text == \
        direct(engine, PROMPT, max_tokens=6, temperature=0.9, top_p=0.8, seed=7)["text"]


def test_echo_logprobs_are_the_models_loglikelihood(served, client):
    engine, _ = served
    text = "Calculate 12 + 30. Answer: 42"
    ids = [engine.tokenizer.eos_token_id, *engine.tokenizer(text, add_special_tokens=False)["input_ids"]]
    for exclude in ([], ["alpha"]):
        r = client.completions.create(model="merged", prompt=[ids], max_tokens=1, temperature=0, echo=True, logprobs=1,
                                      extra_body={"exclude": exclude})
        lp = r.choices[0].logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
        assert sum(lp.token_logprobs[1:len(ids)]) == pytest.approx(engine.server.score(text, exclude=exclude), abs=1e-4)
        assert all(max(top.values()) >= tok - 1e-6 for tok, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))


def test_stop_sequences_end_the_text(served, client):
    engine, _ = served
    sampling = {"max_tokens": 16, "temperature": 1.0, "seed": 3}  # varied text; the seed makes it repeatable
    full = direct(engine, PROMPT, **sampling)["text"]
    at = next(k for k in range(2, len(full) - 1) if full.find(full[k:k + 2]) == k)  # first seen at k
    stop = full[at:at + 2]
    r = client.completions.create(model="merged", prompt=PROMPT, stop=[stop, "never in it \x00"], **sampling)
    assert r.choices[0].text == full[:at] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="merged", prompt=PROMPT, stop=[stop], stream=True, **sampling))
    assert "".join(c.choices[0].text for c in chunks) == full[:at]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": PROMPT, "exclude": ["gamma"]}, 400, "exclude"),
    ({"prompt": PROMPT, "exclude": ["public"]}, 400, "exclude"),
    ({"prompt": PROMPT, "exclude": ["alpha", "beta"]}, 400, "exclude"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 10 ** 9]]}, 400, "prompt"),
    ({"prompt": "word " * 5000}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"prompt": PROMPT, "n": 3}, 400, "n"),
    ({"prompt": PROMPT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": PROMPT, "logprobs": 99}, 400, "logprobs"),
    ({"prompt": PROMPT, "echo": True, "stream": True}, 400, "echo"),
    ({"prompt": PROMPT, "colour": "blue"}, 400, "colour"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ("x" * (2 << 20), 413, None),
])
def test_bad_requests_are_one_line_4xx_and_the_server_carries_on(served, body, status, param):
    _, url = served
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and "\n" not in err["message"] and len(err["message"]) < 300
    if param:
        assert err["message"].startswith(param) or param in err["message"]
    ok = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_a_client_that_disconnects_mid_stream_cancels_its_request(served, monkeypatch):
    engine, url = served
    finished = []
    complete = engine.server.complete

    def counting(*args, **kwargs):
        for event in complete(*args, **kwargs):
            if event["type"] == "done":
                finished.append(event)
            yield event

    monkeypatch.setattr(engine.server, "complete", counting)
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    ok = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}, timeout=30)
    assert ok.status_code == 200
    assert [e["finish_reason"] for e in finished] == ["cancelled", "length"]
    assert finished[0]["completion_tokens"] < 64
    assert httpx.get(url + "/health").json()["queued"] == 0


def test_interleaved_requests_keep_their_own_exclusions(served):
    engine, url = served
    requests = [{"prompt": p, "exclude": ex, "max_tokens": 6, "temperature": 0, "attribution": True}
                for p in (PROMPT, "Calculate 7 + 5.") for ex in ([], ["alpha"], ["beta"])] * 3
    want = [direct(engine, q["prompt"], exclude=q["exclude"], max_tokens=6) for q in requests[:6]] * 3
    start = threading.Barrier(8)  # the first eight leave together: the queue holds mixed exclusions

    def send(item):
        i, q = item
        if i < 8:
            start.wait(timeout=30)
        return httpx.post(url + "/v1/completions", json=q, timeout=120).json()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(send, enumerate(requests)))
    for q, g, w in zip(requests, got, want):
        assert g["excluded"] == q["exclude"]
        assert g["choices"][0]["text"] == w["text"]
        assert g["choices"][0]["attribution"]["prob_share"] == pytest.approx(w["attribution"]["prob_share"], abs=1e-9)
        for owner in q["exclude"]:
            assert g["choices"][0]["attribution"]["prob_share"][owner] == 0.0


def test_lm_eval_local_completions_scores_the_domains_suite_like_the_direct_evaluation(served, ctx, tmp_path):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from flexo.evaluation import evaluate_model, write_domain_tasks

    engine, url = served
    _, layout = ctx
    tasks = write_domain_tasks(layout, ["public", "alpha", "beta"], tmp_path / "tasks", cache_dir=tmp_path / "ds")
    window = 24  # several rolling windows per document
    want = evaluate_model(engine.server.model, engine.server.tokenizer, tasks, limit=2, batch_size=4, max_length=window)
    # lm-eval's API models keep one position for the generated token and one for the rolling context:
    # max_length = window + 2 gives the same windows as the HF backend's max_length = window.
    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="merged", tokenizer=str(engine.server.model_dir),
                             tokenizer_backend="huggingface", max_length=window + 2, batch_size=4, max_retries=1)
    got = evaluate_model(lm, None, tasks, limit=2, batch_size=4, max_length=window)
    assert got.keys() == want.keys()
    for domain in want:
        assert got[domain] == pytest.approx(want[domain], abs=1e-4)


def test_flexo_serve_runs_as_users_run_it_and_refuses_bad_arguments(merged, tmp_path):
    import socket
    import subprocess
    import time

    from conftest import cli_env, flexo_command, run_cli

    for argv, words in ((["serve", "--model", str(tmp_path / "nowhere")], "not a model folder"),
                        (["serve", "--model", str(merged), "--max-tokens-limit", "0"], "--max-tokens-limit"),
                        (["serve", "--model", str(merged), "--port", "70000"], "--port")):
        r = run_cli(argv)
        assert r.rc == 2 and words in r.err and r.err.count("\n") == 1, r.err

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*flexo_command(), "serve", "--model", str(merged), "--port", str(port)],
                            env=cli_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.time() < deadline, "flexo serve did not answer within 90 s"
                time.sleep(0.3)
        assert health["status"] == "ok" and health["experts"] == ["public", "alpha", "beta"]
        page = httpx.get(f"http://127.0.0.1:{port}/").text
        assert "flexo playground" in page and "http://" not in page and "https://" not in page  # nothing from the internet
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "exclude": ["alpha"]}, timeout=60)
        assert r.status_code == 200 and r.json()["excluded"] == ["alpha"]
        taken = run_cli(["serve", "--model", str(merged), "--port", str(port)])
        assert taken.rc == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.err and taken.err.count("\n") == 1
        proc.terminate()  # SIGTERM stops it cleanly, as Ctrl+C does
        assert proc.wait(timeout=30) == 0 and "flexo: stopped" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_an_engine_without_masking_refuses_exclusions_and_attribution_saying_why(merged):
    """The HTTP gate `--engine vllm` relies on, exercised with the flexo model behind it (vLLM needs a GPU)."""
    from flexo.openai_server import Engine
    from flexo.serving import FlexoServer

    class NoMasking(FlexoServer):
        supports_opt_out = False

    engine = Engine(NoMasking(merged), model_id="merged")
    try:
        with serving_in_thread(create_app(engine)) as url:
            for extra, param in (({"exclude": ["beta"]}, "exclude"), ({"attribution": True}, "attribution")):
                r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **extra}, timeout=30)
                assert r.status_code == 400 and r.json()["error"]["param"] == param
                assert "vLLM" in r.json()["error"]["message"] and "mask" in r.json()["error"]["message"]
            r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0}, timeout=30)
            assert r.status_code == 200
            assert httpx.get(url + "/v1/models").json()["data"][0]["engine"] == "vllm"
    finally:
        engine.close()


def test_engine_vllm_without_vllm_or_a_gpu_is_one_line(merged):
    from conftest import run_cli
    from flexo.vllm_engine import vllm_available

    if vllm_available() is None:
        pytest.skip("vLLM and a GPU are here: test_vllm_engine_serves_the_model covers it")
    r = run_cli(["serve", "--model", str(merged), "--engine", "vllm", "--port", "0"])
    assert r.rc == 2 and "--engine vllm cannot run here" in r.err and r.err.count("\n") == 1


@pytest.mark.gpu
def test_vllm_engine_serves_the_model(merged):
    from flexo.vllm_engine import vllm_available

    if vllm_available() is not None:
        pytest.skip(f"--engine vllm: {vllm_available()}")
    engine = load_engine(merged, engine="vllm")
    try:
        with serving_in_thread(create_app(engine)) as url:
            r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0},
                           timeout=120)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        engine.close()
