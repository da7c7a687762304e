"""`flexo serve`: an OpenAI-compatible HTTP server for a flexo model, with per-request opt-out and attribution.

    flexo serve --model models/merged-rt --port 8000

    GET  /health               liveness, the model and the queue
    GET  /v1/models            the served model, its experts and the owners a request may exclude
    POST /v1/completions       OpenAI's legacy completions: prompt (text, token ids, or a batch of either),
                               max_tokens, temperature, top_p, stop, seed, logprobs, echo, stream (SSE);
                               flexo's fields: `exclude` (owners opted out for this request only) and
                               `attribution` (`true`: each owner's share of the routing; `"tokens"`: also
                               per generated token). Each choice carries `attribution`, the response
                               `excluded`.
    GET  /                     the playground (flexo/playground.html: no assets from the internet)

The official `openai` client talks to it (`extra_body={"exclude": [...], "attribution": "tokens"}`), and
so does lm-eval's `local-completions` model: echo + logprobs give the log-likelihood of every prompt token.

**One model, one worker.** The opt-out masks the model in place, so one worker thread runs requests one
at a time, in arrival order, each with its own mask (`FlexoServer.opt_out`): exclusions of interleaved
requests cannot mix. A request excluding owners is the model opted out exactly (`FlexoServer` explains
why; for a router-tuned model the kept rows are refitted). A streaming client that disconnects cancels
its request between two tokens.

**Every bad request is a 4xx with one line naming the field** (OpenAI's error shape: `error.message`,
`error.param`): unknown or `public` owners, excluding every owner, an empty or over-long prompt,
max_tokens out of range, malformed JSON, unknown fields, an oversized body. Nothing a client sends stops
the server.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import queue
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flexo.errors import FlexoError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a prompt of 4096 tokens is ~20 kB as text or token ids; 1 MiB is generous
MAX_BATCH = 64  # prompts per request (lm-eval sends batch_size of them)
MAX_LOGPROBS = 20
# What the fields with more than one accepted form take (pydantic would name only the first form).
SHAPES = {"prompt": "a text, a list of token ids, or a list of texts or of token-id lists",
          "stop": "a string or a list of at most 4 strings", "exclude": "a list of owner names",
          "attribution": 'true, false or "tokens"'}
# OpenAI's fields flexo does not implement, accepted only at the value that changes nothing.
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": "{} or zeros", "suffix": '""'}


class ApiError(Exception):
    """A request the server refuses: HTTP status, the field at fault, one line saying what to change."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------- the request
class CompletionRequest(BaseModel):
    """POST /v1/completions. OpenAI's fields that would change the answer but are not implemented
    (penalties, logit_bias, n > 1, best_of > 1, suffix) are accepted only at their neutral value, so a
    client never gets a silently different completion; any other unknown field is refused."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stream: bool = False
    n: Literal[1] = 1
    best_of: Literal[1] | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: dict[str, Literal[0]] | None = None
    suffix: Literal[""] | None = None
    user: str | None = None
    stream_options: dict | None = None
    # flexo's own fields
    exclude: list[str] = Field(default_factory=list)
    attribution: bool | Literal["tokens"] = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return stops


@dataclass
class Prepared:
    """A validated request: token ids per prompt and what to do with them."""

    prompts: list[list[int]]
    exclude: list[str]
    options: dict[str, Any]
    stream: bool
    attribution: bool | str


# ------------------------------------------------------------------------------------------ the engine
@dataclass
class Job:
    """One request in the worker's queue; the worker pushes events, the HTTP side reads them."""

    request: Prepared
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def push(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def push_all(self, events: list[dict]) -> None:
        def put():
            for event in events:
                self.events.put_nowait(event)

        self.loop.call_soon_threadsafe(put)

    async def stream(self) -> AsyncIterator[dict]:
        while True:
            event = await self.events.get()
            if event["type"] == "error":
                raise ApiError(event["status"], event["message"], event.get("param"))
            yield event
            if event["type"] == "end":
                return


class Engine:
    """The loaded model and the one worker thread that runs requests in arrival order."""

    def __init__(self, server, *, model_id: str, max_tokens_limit: int = 256, max_prompt_tokens: int | None = None,
                 worker: bool = True):
        self.server = server  # FlexoServer, or flexo.vllm_engine.VllmServer (no opt-out, no attribution)
        self.engine_name = "flexo" if getattr(server, "supports_opt_out", True) else "vllm"
        self.model_id = model_id
        self.max_tokens_limit = int(max_tokens_limit)
        self.max_prompt_tokens = int(max_prompt_tokens or server.positions)
        # Its own copy: a fast tokenizer used from two threads at once can fail ("Already borrowed") when a
        # call resets its truncation/padding state; the worker decodes with the server's.
        self.tokenizer = copy.deepcopy(server.tokenizer)
        self.vocab = len(self.tokenizer)
        self.owners = [e for e in server.experts if e != "public"]
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        if worker:
            self._worker = threading.Thread(target=self.run_jobs, name="flexo-serve-worker", daemon=True)
            self._worker.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def close(self) -> None:
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(timeout=30)

    # -- validation, on the event loop: cheap, so that a bad request never waits in the queue
    def prepare(self, req: CompletionRequest) -> Prepared:
        if req.model is not None and req.model != self.model_id:
            raise ApiError(404, f"model {req.model!r} is not served here: this server serves {self.model_id!r} "
                                "(GET /v1/models)", "model", "model_not_found")
        prompts = self._prompt_ids(req.prompt)
        exclude = self._exclusions(req.exclude)
        if self.engine_name == "vllm" and (exclude or req.attribution):
            from flexo.vllm_engine import WHY

            field_name = "exclude" if exclude else "attribution"
            raise ApiError(400, f"{field_name}: this server runs vLLM, which {WHY.removeprefix('vLLM ')} and does not "
                                "expose its routers: ask the flexo engine (flexo serve without --engine vllm), or "
                                "serve an opted-out folder", field_name)
        low = 0 if req.echo else 1  # max_tokens 0 only to score a prompt (echo), as OpenAI's API allowed
        if not low <= req.max_tokens <= self.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be between {low} and {self.max_tokens_limit} on this server, "
                                f"got {req.max_tokens}", "max_tokens")
        for i, ids in enumerate(prompts):
            where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            if len(ids) > self.max_prompt_tokens:
                raise ApiError(400, f"{where} has {len(ids)} tokens, more than this server's {self.max_prompt_tokens}: "
                                    "shorten it", "prompt")
            if len(ids) + max(req.max_tokens - 1, 0) > self.server.positions:
                raise ApiError(400, f"{where} of {len(ids)} tokens plus max_tokens {req.max_tokens} exceeds the model's "
                                    f"{self.server.positions} positions: shorten the prompt or lower max_tokens",
                               "max_tokens")
        if req.stream and req.echo:
            raise ApiError(400, "echo cannot be combined with stream: ask for the echoed log-probabilities "
                                "without streaming", "echo")
        options = {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                   "seed": req.seed, "stop": req.stop or [], "logprobs": req.logprobs, "echo": req.echo}
        return Prepared(prompts, exclude, options, req.stream, req.attribution)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        if isinstance(prompt, list) and not prompt:
            raise ApiError(400, "prompt is an empty list: pass a text, token ids, or a list of either", "prompt")
        if len(batch) > MAX_BATCH:
            raise ApiError(400, f"prompt holds {len(batch)} prompts, more than {MAX_BATCH}: split the batch", "prompt")
        out = []
        for i, p in enumerate(batch):
            where = f"prompt[{i}]" if len(batch) > 1 else "prompt"
            if isinstance(p, str):
                if not p:
                    raise ApiError(400, f"{where} is empty: pass at least one character", "prompt")
                if len(p) > 64 * self.max_prompt_tokens:  # no tokenizer run on a text that cannot fit
                    raise ApiError(400, f"{where} of {len(p)} characters is longer than this server takes: "
                                        "shorten it", "prompt")
                ids = list(self.tokenizer(p, add_special_tokens=False)["input_ids"])
            else:
                ids = list(p)
                if not ids:
                    raise ApiError(400, f"{where} is an empty list of token ids", "prompt")
                bad = [t for t in ids if not 0 <= t < self.vocab]
                if bad:
                    raise ApiError(400, f"{where} has token id {bad[0]} outside the vocabulary (0..{self.vocab - 1})",
                                   "prompt")
            out.append(ids)
        return out

    def _exclusions(self, exclude: list[str]) -> list[str]:
        names = list(dict.fromkeys(exclude))
        for name in names:
            if name == "public":
                raise ApiError(400, "exclude: the public expert cannot be excluded (it is expert 0 of every "
                                    "FlexOlmo model)", "exclude")
            if name not in self.owners:
                raise ApiError(400, f"exclude: {name!r} is not an owner of this model; its owners are {self.owners}",
                               "exclude")
        if names and set(names) == set(self.owners):
            raise ApiError(400, f"exclude names every owner ({', '.join(self.owners)}): keep at least one, or "
                                "serve the public model for public-only answers", "exclude")
        return names

    # -- the worker thread
    def submit(self, request: Prepared) -> Job:
        job = Job(request, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def run_jobs(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Run queued requests until `close()` (or until `alive()` turns false). `flexo serve` calls this
        on the main thread, the one that loaded the model: torch's OpenMP runs each small operation
        several times slower from any thread other than the first that used it (measured: 81 µs instead
        of 8 µs for a 64-row softmax on 2 cores), so decoding in a second thread took twice as long."""
        while alive():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            # A streamed request gets each token as it comes; any other gets its events in one hand-over
            # at the end: waking the event loop per token while torch's threads run halves the speed of
            # decoding on 2 cores (measured: 0.49 s instead of 0.24 s for 32 tokens).
            held: list[dict] | None = None if job.request.stream else []
            try:
                for index, ids in enumerate(job.request.prompts):
                    for event in self.server.complete(ids, exclude=job.request.exclude,
                                                      cancelled=job.cancelled.is_set, **job.request.options):
                        if held is None:
                            job.push({**event, "index": index})
                        else:
                            held.append({**event, "index": index})
                job.push_all([*(held or []), {"type": "end"}])
            except FlexoError as e:
                job.push({"type": "error", "status": 400, "message": str(e)})
            except Exception as e:  # noqa: BLE001 — the worker must outlive any one request
                log.exception("request failed")
                job.push({"type": "error", "status": 500, "message": f"the server failed on this request "
                                                                     f"({type(e).__name__}: {e})"})


# --------------------------------------------------------------------------------------- the responses
def _choice_attribution(done: dict, tokens: list[dict], mode: bool | str, experts: list[str]) -> dict | None:
    if not mode:
        return None
    a = dict(done["attribution"])
    a.pop("layers", None)  # per-layer shares: `flexo attribute` has them; a response stays small
    if mode == "tokens":
        a["per_token"] = [_token_attribution(t, experts) for t in tokens]
    return a


def _token_attribution(token: dict, experts: list[str]) -> dict:
    shares = dict(zip(experts, token["routing"]))
    return {"text": token["piece"], "owner": max(experts, key=lambda e: shares[e]), "prob_share": shares}


def _logprobs(prompt: dict | None, tokens: list[dict]) -> dict:
    pieces, lps, tops = [], [], []
    if prompt is not None:
        pieces += prompt["pieces"]
        lps += prompt["logprobs"]
        tops += prompt["top"] if prompt["top"] is not None else [None] * len(prompt["pieces"])
    for t in tokens:
        pieces.append(t["piece"])
        lps.append(t["logprob"])
        tops.append(t["top"])
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _echo_text(prompt: dict | None) -> str:
    return "".join(prompt["pieces"]) if prompt is not None else ""


async def completion_body(engine: Engine, job: Job, rid: str) -> dict:
    """The whole (non-streaming) response of a job."""
    req = job.request
    prompts: dict[int, dict] = {}
    tokens: dict[int, list[dict]] = {i: [] for i in range(len(req.prompts))}
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
    async for ev in job.stream():
        i = ev.get("index")
        if ev["type"] == "prompt":
            prompts[i] = ev
        elif ev["type"] == "token":
            tokens[i].append(ev)
        elif ev["type"] == "done":
            usage["prompt_tokens"] += ev["prompt_tokens"]
            usage["completion_tokens"] += ev["completion_tokens"]
            echo = req.options["echo"]
            choice = {"index": i, "text": _echo_text(prompts.get(i)) + ev["text"] if echo else ev["text"],
                      "finish_reason": ev["finish_reason"],
                      "logprobs": _logprobs(prompts.get(i), tokens[i]) if req.options["logprobs"] is not None else None}
            attribution = _choice_attribution(ev, tokens[i], req.attribution, engine.server.experts)
            if attribution is not None:
                choice["attribution"] = attribution
            choices.append(choice)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": engine.model_id,
            "choices": choices, "usage": usage, "excluded": req.exclude}


async def completion_events(engine: Engine, job: Job, rid: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new token, the last of each prompt with its finish_reason (and
    its attribution when asked), then `[DONE]`. A client that goes away cancels the job."""
    req, created = job.request, int(time.time())

    def chunk(choice: dict) -> str:
        body = {"id": rid, "object": "text_completion", "created": created, "model": engine.model_id,
                "choices": [choice], "excluded": req.exclude}
        return f"data: {json.dumps(body)}\n\n"

    tokens: dict[int, list[dict]] = {}
    try:
        async for ev in job.stream():
            i = ev.get("index")
            if ev["type"] == "token":
                tokens.setdefault(i, []).append(ev)
                choice = {"index": i, "text": ev["text"], "finish_reason": None,
                          "logprobs": _logprobs(None, [ev]) if req.options["logprobs"] is not None else None}
                if req.attribution == "tokens":
                    choice["token_attribution"] = _token_attribution(ev, engine.server.experts)
                yield chunk(choice)
            elif ev["type"] == "done":
                choice = {"index": i, "text": "", "finish_reason": ev["finish_reason"], "logprobs": None}
                attribution = _choice_attribution(ev, tokens.get(i, []), req.attribution, engine.server.experts)
                if attribution is not None:
                    choice["attribution"] = attribution
                yield chunk(choice)
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        job.cancelled.set()  # normal end: a no-op; a disconnect: the worker stops at the next token


# --------------------------------------------------------------------------------------------- the app
def create_app(engine: Engine):
    """The FastAPI application serving `engine`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="flexo", description="An OpenAI-compatible server for a flexo model: per-request "
                  "opt-out and attribution.", docs_url="/docs", redoc_url=None)
    app.state.engine = engine

    @app.middleware("http")
    async def bounded_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            err = ApiError(413, f"request body of {length} bytes is over this server's {MAX_BODY_BYTES} bytes: "
                                "send fewer or shorter prompts", None)
            return JSONResponse(err.body(), status_code=err.status)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "experts": engine.server.experts, "queued": engine.queued}

    @app.get("/v1/models")
    async def models():
        meta = engine.server.meta
        return {"object": "list", "data": [{
            "id": engine.model_id, "object": "model", "created": 0, "owned_by": "flexo",
            "experts": engine.server.experts, "excludable": engine.owners,
            "top_k": engine.server.top_k, "engine": engine.engine_name,
            "router": meta.get("router_tune", {}).get("method") if isinstance(meta.get("router_tune"), dict) else None,
            "max_tokens_limit": engine.max_tokens_limit, "max_prompt_tokens": engine.max_prompt_tokens}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        job = engine.submit(engine.prepare(req))
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if job.request.stream:
            return StreamingResponse(completion_events(engine, job, rid), media_type="text/event-stream")
        try:
            return await completion_body(engine, job, rid)
        finally:
            job.cancelled.set()

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("flexo").joinpath("playground.html").read_text(encoding="utf-8")

    return app


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors as one line naming the field (the first error: fixing it is the next step)."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))}): "
                             "send a JSON object", None)
    if not loc:
        return ApiError(400, f"the request body must be a JSON object with a prompt ({e.get('msg')})", None)
    name = loc[0]
    if e.get("type") == "extra_forbidden":
        return ApiError(400, f"{name}: unknown field (flexo serves OpenAI's completions fields plus exclude and "
                             "attribution)", name)
    if e.get("type") == "missing":
        return ApiError(400, f"{name}: required", name)
    got = json.dumps(e.get("input"), default=str)
    got = got if len(got) <= 60 else got[:57] + "..."
    if name in SHAPES and e.get("type") != "value_error":
        return ApiError(400, f"{name}: must be {SHAPES[name]} (got {got})", name)
    if name in NEUTRAL:
        return ApiError(400, f"{name}: flexo serve does not implement it; only {NEUTRAL[name]} is accepted (got {got})",
                        name)
    where = ".".join(loc[:1] + [x for x in loc[1:] if not x.startswith(("list[", "str", "int", "literal"))])
    return ApiError(400, f"{where}: {e.get('msg', 'invalid')} (got {got})", name)


# ---------------------------------------------------------------------------------------- running it
def load_engine(model_dir: Path | str, *, max_tokens_limit: int = 256, max_prompt_tokens: int | None = None,
                engine: str = "flexo", worker: bool = True) -> Engine:
    """The model folder loaded by `engine` ("flexo": per-request opt-out and attribution; "vllm": GPU)."""
    model_dir = Path(model_dir)
    if engine == "vllm":
        from flexo.vllm_engine import VllmServer

        server = VllmServer(model_dir)
    elif engine == "flexo":
        from flexo.serving import FlexoServer

        server = FlexoServer(model_dir)
        server.model.eval()
    else:
        raise FlexoError(f"--engine {engine!r} is not one of flexo, vllm")
    return Engine(server, model_id=model_dir.name, max_tokens_limit=max_tokens_limit,
                  max_prompt_tokens=max_prompt_tokens, worker=worker)


@contextmanager
def serving_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (tests, benchmarks, the screenshot); yields its base
    URL (`port=0`: a free port) and stops it on exit."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="flexo-serve-http", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise FlexoError(f"cannot listen on {host}:{port} (the port is taken, or the address is not this "
                             "machine's): pick another --port or --host")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
