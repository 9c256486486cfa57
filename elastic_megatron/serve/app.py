"""`elastic-megatron serve`: an OpenAI-compatible HTTP server for every budget of one checkpoint.

    elastic-megatron serve --checkpoint runs/elastic [--budget 6B --budget 9B] [--host 127.0.0.1 --port 8000]
    curl localhost:8000/v1/completions -d '{"model": "elastic-6B", "prompt": "q: 3+4*2=?\\n", "max_tokens": 64,
                                            "temperature": 0}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models (each budget its own model id, plus the names given with --budget), GET
/health. Honoured: max_tokens, temperature, top_p, stop, seed, n=1. Extra: "budget_schedule":
{"think": ID, "answer": ID, "switch": "a:"} reasons with one budget and answers with another (see
`_scheduled`). Bad requests get a 4xx with one OpenAI-style JSON error and the server goes on.

FastAPI + uvicorn: the stack vLLM's own OpenAI server uses, so clients, proxies and load balancers
that work there work here; routing, JSON and SSE framing are theirs, the decoding is engine.py's.
"""

from __future__ import annotations

import json
import queue
import socket
import time
import uuid
from typing import Iterator, Optional

try:  # the HTTP side; Server (requests -> engine) works without it, as the demo's serving section uses it
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
except ImportError:  # pip install 'elastic-megatron[serve]'
    FastAPI = None

from .engine import Engine, Request

MAX_STOPS = 4  # OpenAI's limit


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _error(exc: BadRequest):
    return JSONResponse(status_code=exc.status, content={"error": {
        "message": str(exc), "type": "invalid_request_error" if exc.status < 500 else "server_error",
        "param": exc.param, "code": exc.code}})


def _number(body: dict, key: str, default, lo: float, hi: float, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v) or not lo <= v <= hi:
        raise BadRequest(400, f"'{key}' must be a {'whole ' if kind is int else ''}number in [{lo}, {hi}], "
                              f"got {v!r}", key)
    return kind(v)


class Server:
    """The request side: parse and check a body, turn it into engine Requests, shape the answer."""

    def __init__(self, engine: Engine, answer_switch: str = "a:"):
        self.engine, self.switch = engine, answer_switch

    # -- parsing ------------------------------------------------------------------

    def _model(self, name, param: str = "model"):
        if not isinstance(name, str) or name not in self.engine.by_name:
            known = ", ".join(self.engine.by_name)
            raise BadRequest(404, f"model {name!r} is not served here (not a trained budget of this checkpoint); "
                                  f"use one of: {known}", param, "model_not_found")
        return self.engine.by_name[name]

    def _prompt(self, body: dict, chat: bool) -> str:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                raise BadRequest(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": \"...\"}",
                                 "messages")
            hf = getattr(self.engine.tok, "tok", None)  # a Hugging Face tokenizer with a chat template uses it
            if hf is not None and getattr(hf, "chat_template", None):
                return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return "".join(m["content"] for m in msgs)  # the demo's models: no template, the text as written
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest(400, "'prompt' must be a string (one prompt per request)", "prompt")
        return prompt

    def parse(self, raw: bytes, chat: bool) -> tuple[dict, Request, Optional[dict]]:
        try:
            body = json.loads(raw or b"")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        budget = self._model(body.get("model"))
        if _number(body, "n", 1, 1, 1, int) != 1:
            raise BadRequest(400, "'n' must be 1", "n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest(400, f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
        max_tokens = _number(body, "max_tokens", 16, 1, self.engine.max_len, int)
        req = Request(budget.id, self.engine.tok.encode(self._prompt(body, chat)), max_tokens=max_tokens,
                      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 1e-6, 1.0), stop=stop,
                      seed=_number(body, "seed", None, -2**63, 2**63 - 1, int))
        total = 1 + len(req.prompt_ids) + max_tokens  # <bos> + prompt + the answer
        if total > self.engine.max_len:
            raise BadRequest(400, f"prompt too long: {len(req.prompt_ids)} prompt tokens + max_tokens {max_tokens} "
                                  f"exceed the model's {self.engine.max_len}-token context", "prompt",
                             "context_length_exceeded")
        schedule = body.get("budget_schedule")
        if schedule is not None:
            if not isinstance(schedule, dict) or set(schedule) - {"think", "answer", "switch"} or \
                    not {"think", "answer"} <= set(schedule):
                raise BadRequest(400, "'budget_schedule' must be {\"think\": MODEL, \"answer\": MODEL, "
                                      "\"switch\": TEXT (optional)}", "budget_schedule")
            sw = schedule.get("switch", self.switch)
            if not isinstance(sw, str) or not sw:
                raise BadRequest(400, "'budget_schedule.switch' must be a non-empty string", "budget_schedule")
            schedule = {"think": self._model(schedule["think"], "budget_schedule.think").id,
                        "answer": self._model(schedule["answer"], "budget_schedule.answer").id, "switch": sw}
        return body, req, schedule

    # -- running ------------------------------------------------------------------

    def run(self, req: Request, schedule: Optional[dict], emit=None) -> tuple[str, str, dict]:
        """(text, finish_reason, usage) of a request, its schedule followed; `emit` gets streamed pieces."""
        if schedule is None:
            req.on_token = emit
            self.engine.generate(req)
            return req.text, req.finish_reason, {"prompt_tokens": len(req.prompt_ids),
                                                 "completion_tokens": len(req.ids)}
        return self._scheduled(req, schedule, emit)

    def _scheduled(self, req: Request, sch: dict, emit) -> tuple[str, str, dict]:
        """Think small, answer big: the think budget generates until it writes the switch text (the
        answer line), then the answer budget re-reads prompt + reasoning + switch (one prefill of
        the whole prefix on its own weights: the two budgets' Mamba states and KV caches have
        different widths, so nothing can be carried over) and writes the answer."""
        t0 = time.perf_counter()
        think = Request(sch["think"], req.prompt_ids, req.max_tokens, req.temperature, req.top_p,
                        [sch["switch"], *req.stop], req.seed, emit)
        self.engine.generate(think)
        t1 = time.perf_counter()
        switched = think.finish_reason == "stop" and len(think.ids) < req.max_tokens and \
            sch["switch"] in self.engine.tok.decode(think.ids)
        info = {"think_model": sch["think"], "answer_model": sch["answer"], "switched": switched,
                "think_tokens": len(think.ids), "think_s": round(t1 - t0, 4)}
        if not switched:
            return think.text, think.finish_reason, {"prompt_tokens": len(req.prompt_ids),
                                                     "completion_tokens": len(think.ids), "budget_schedule": info}
        prefix = think.text + sch["switch"]
        if emit is not None:
            emit(sch["switch"])
        ids = self.engine.tok.encode(prefix)
        answer = Request(sch["answer"], req.prompt_ids + ids, max(1, req.max_tokens - len(ids)), req.temperature,
                         req.top_p, req.stop, req.seed, emit)
        self.engine.generate(answer)
        info.update(answer_tokens=len(answer.ids), reprefill_tokens=1 + len(answer.prompt_ids),
                    answer_s=round(time.perf_counter() - t1, 4))
        return prefix + answer.text, answer.finish_reason, {
            "prompt_tokens": len(req.prompt_ids), "completion_tokens": len(ids) + len(answer.ids),
            "budget_schedule": info}


def _shape(body: dict, chat: bool, text: str, finish: str, usage: dict, rid: str, created: int) -> dict:
    usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    if chat:
        return {"id": rid, "object": "chat.completion", "created": created, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                             "logprobs": None}], "usage": usage}
    return {"id": rid, "object": "text_completion", "created": created, "model": body["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}


def _chunk(body: dict, chat: bool, piece: Optional[str], finish: Optional[str], rid: str, created: int) -> str:
    if chat:
        delta = {} if piece is None else {"content": piece}
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body["model"],
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    else:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": body["model"],
               "choices": [{"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}]}
    return f"data: {json.dumps(obj)}\n\n"


def build_app(engine: Engine, answer_switch: str = "a:"):
    app, server, started = FastAPI(title="elastic-megatron"), Server(engine, answer_switch), int(time.time())

    @app.get("/health")
    def health():
        return {"status": "ok", "models": [b.id for b in engine.budgets]}

    @app.get("/v1/models")
    def models():
        data = []
        for b in engine.budgets:
            for name in dict.fromkeys([b.id, *b.aliases]):
                data.append({"id": name, "object": "model", "created": started, "owned_by": "elastic-megatron",
                             "root": b.id, "params": b.params})
        return {"object": "list", "data": data}

    def complete(raw: bytes, chat: bool):
        try:
            body, req, schedule = server.parse(raw, chat)
        except BadRequest as exc:
            return _error(exc)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.get("stream"):
            try:
                text, finish, usage = server.run(req, schedule)
            except Exception as exc:  # a decode failure: this request fails, the server goes on
                return _error(BadRequest(500, f"generation failed: {type(exc).__name__}: {exc}"))
            return JSONResponse(_shape(body, chat, text, finish, usage, rid, created))
        return StreamingResponse(_stream(server, body, req, schedule, chat, rid, created),
                                 media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await _in_thread(complete, await request.body(), False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await _in_thread(complete, await request.body(), True)

    return app


async def _in_thread(fn, *args):
    """Decoding waits block: off the event loop, so other clients are read and queued meanwhile."""
    return await run_in_threadpool(fn, *args)


def _stream(server: Server, body: dict, req: Request, schedule, chat: bool, rid: str, created: int) -> Iterator[str]:
    """Server-sent events: the pieces as the engine makes them, the finish reason, then [DONE]."""
    import threading

    pieces: queue.Queue = queue.Queue()
    result: dict = {}

    def work():
        try:
            result["out"] = server.run(req, schedule, emit=pieces.put)
        except Exception as exc:
            result["error"] = exc
        pieces.put(None)

    threading.Thread(target=work, daemon=True).start()
    if chat:  # OpenAI's first chat chunk names the role
        first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body["model"],
                 "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        yield f"data: {json.dumps(first)}\n\n"
    while (piece := pieces.get()) is not None:
        yield _chunk(body, chat, piece, None, rid, created)
    if "error" in result:
        yield f"data: {json.dumps({'error': {'message': str(result['error']), 'type': 'server_error'}})}\n\n"
    else:
        yield _chunk(body, chat, None, result["out"][1], rid, created)
    yield "data: [DONE]\n\n"


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before the slow load: a port in use fails in a second with one
    line, and port 0 lets the OS pick a free one with no window for another process to take it
    (picking a free port, closing it and binding again later is a race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop, as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from ..config import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port, "
                          "or --port 0 for any free one") from None
    return sock


def serve(cfg, budgets: list[str], host: str, port: int, router_path: str = "", answer_switch: str = "a:") -> None:
    """Load once, say what is served, then answer until stopped (Ctrl-C / SIGTERM)."""
    import sys

    import uvicorn

    sock = bind(host, port)
    port = sock.getsockname()[1]  # the real one when --port 0
    engine = Engine.load(cfg, budgets, router_path)
    ids = ", ".join(f"{b.id} ({'/'.join(b.aliases)}, {b.params:,} parameters)" for b in engine.budgets)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {ids} on http://{shown}:{port}/v1", flush=True)
    sys.stdout.flush()
    config = uvicorn.Config(build_app(engine, answer_switch), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])  # listen() happens here: no client connects before the load
