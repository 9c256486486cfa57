"""`elastic-megatron serve`: the real server on 127.0.0.1, a real HTTP client, every budget from one set of weights.

Checked: /v1/models lists every budget; greedy answers equal `generate --budget`'s for each budget;
streaming equals non-streaming; bad requests get a 4xx with one JSON error and the server still
answers; a budget's weight matrices are views inside the parent's storage (no copies); a budget
schedule switches budgets at the answer line; concurrent requests do not disturb each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import FAST, REPO, make_sorted_parent, run_cli

httpx = pytest.importorskip("httpx")

PARENT = [*FAST, "data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4"]
PROMPTS = ["q: 3+4*2=?\n", "q: sort [5,2,7]\n", "q: 12-5+3=?\n"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    sorted_args = make_sorted_parent(root, PARENT)
    # the middle budget hand-picked with query heads cut (1 of 2 per group): the engine multiplies
    # linear_qkv / linear_proj run by run there, and a head-dim cut exercises the channel packing
    run_cli(["elastic-train", *sorted_args, *FAST, "curriculum=[{name: short, steps: 2}]",
             'elastic.subnets=["","attn_heads=0.5,mamba_head_dim=0.75,ffn=0.5",""]',
             f"logging.out_dir={root / 'elastic'}"])
    return root / "elastic"


def _served_url(proc: subprocess.Popen, timeout: float = 180) -> str:
    """The address from the server's first line (`--port 0`: the OS picks the port while the server
    binds it, so no other process can take it in between, as a port picked here and freed could)."""
    import queue
    import re
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError("the server said nothing in time") from None
    found = re.search(r" on (http://\S+)/v1$", line.strip())
    assert found, (line, proc.communicate())
    return found.group(1)


@pytest.fixture(scope="module")
def server(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    from tests.unit.test_cli import console_script

    # the console script a user types, on a port the OS picks
    proc = subprocess.Popen([console_script(), "serve", "--checkpoint", str(run_dir), "--port", "0"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = _served_url(proc)
    assert not url.endswith(":0")
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.3)
    client = httpx.Client(base_url=url, timeout=120)
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def models(server):
    data = server.get("/v1/models").json()["data"]
    return {m["id"]: m for m in data}


def _complete(server, model, prompt, **kw):
    r = server.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_NEW,
                                             "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_every_budget_and_the_given_names(models):
    roots = {m["root"] for m in models.values()}
    assert len(roots) == 3  # the two trained budgets and the full model
    assert {"0.5", "0.75", "1.0"} <= set(models)  # the names the checkpoint's budgets were given
    assert all(i.startswith("elastic-") for i in roots)
    sizes = sorted({m["params"] for m in models.values()})
    assert sizes[0] < sizes[1] < sizes[2]


def test_greedy_answers_equal_generate_for_every_budget(server, run_dir):
    from elastic_megatron.formats.hf_jobs import resolve_export_config
    from elastic_megatron.generate import generate_elastic

    cfg = resolve_export_config(None, str(run_dir), [])
    for budget in ("0.5", "0.75", "1.0"):
        want = generate_elastic(cfg, budget, PROMPTS, MAX_NEW)
        got = [_complete(server, budget, p)["choices"][0]["text"] for p in PROMPTS]
        assert got == want, budget


def test_chat_and_streaming_equal_the_plain_answer(server):
    plain = _complete(server, "0.5", PROMPTS[0])["choices"][0]
    with server.stream("POST", "/v1/completions", json={"model": "0.5", "prompt": PROMPTS[0], "max_tokens": MAX_NEW,
                                                        "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    chat = server.post("/v1/chat/completions", json={"model": "0.5", "messages": [{"role": "user", "content": PROMPTS[0]}],
                                                      "max_tokens": MAX_NEW, "temperature": 0}).json()
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": plain["text"]}


def test_stop_seed_and_sampling(server):
    full = _complete(server, "1.0", PROMPTS[0])["choices"][0]["text"]
    assert len(full) > 3, full  # the answer must be long enough to cut inside
    cut = _complete(server, "1.0", PROMPTS[0], stop=[full[2:4]])["choices"][0]
    assert cut["text"] == full[:full.index(full[2:4])] and cut["finish_reason"] == "stop"
    a = _complete(server, "1.0", PROMPTS[1], temperature=1.0, top_p=0.9, seed=7)["choices"][0]["text"]
    b = _complete(server, "1.0", PROMPTS[1], temperature=1.0, top_p=0.9, seed=7)["choices"][0]["text"]
    assert a == b  # one seed, one answer
    n = _complete(server, "1.0", PROMPTS[1], max_tokens=3)["choices"][0]
    assert n["finish_reason"] in ("length", "stop") and len(n["text"]) <= 3


@pytest.mark.parametrize("body,status,word", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "elastic-nope", "prompt": "q"}).encode(), 404, "not served here"),
    (json.dumps({"model": "0.5", "prompt": "q", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "0.5", "prompt": "q" * 5000, "max_tokens": 8}).encode(), 400, "prompt too long"),
    (json.dumps({"model": "0.5", "prompt": "q", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": "0.5", "prompt": "q", "budget_schedule": {"think": "0.5"}}).encode(), 400, "budget_schedule"),
    (json.dumps({"model": "0.5", "prompt": "q", "budget_schedule": {"think": "x", "answer": "1.0"}}).encode(), 404,
     "not served here"),
], ids=["malformed-json", "unknown-model", "max-tokens", "too-long", "bad-temperature", "bad-schedule",
        "schedule-unknown-model"])
def test_bad_requests_are_4xx_with_one_json_error_and_the_server_goes_on(server, body, status, word):
    r = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert word in err["message"] and "\n" not in err["message"]
    assert _complete(server, "0.5", PROMPTS[0])["choices"][0]["finish_reason"]  # still serving


def test_budget_schedule_thinks_small_and_answers_big(server):
    """Forced switch text that the small budget is sure to write early: the answer budget takes over there."""
    small = _complete(server, "0.5", PROMPTS[0])["choices"][0]["text"]
    assert len(small) >= 2, small  # long enough to switch inside
    switch = small[1]
    r = _complete(server, "0.5", PROMPTS[0], budget_schedule={"think": "0.5", "answer": "1.0", "switch": switch})
    info = r["usage"]["budget_schedule"]
    assert info["switched"] and info["reprefill_tokens"] == 1 + len(PROMPTS[0]) + small.index(switch) + 1
    text = r["choices"][0]["text"]
    assert text.startswith(small[:small.index(switch) + 1])
    # the same as asking the full budget to continue the small budget's reasoning
    cont = _complete(server, "1.0", PROMPTS[0] + text[:small.index(switch) + 1],
                     max_tokens=MAX_NEW - (small.index(switch) + 1))["choices"][0]["text"]
    assert text == small[:small.index(switch) + 1] + cont


def test_concurrent_clients_get_their_own_answers(server):
    jobs = [(b, p) for b in ("0.5", "0.75", "1.0") for p in PROMPTS] * 2
    alone = {(b, p): _complete(server, b, p)["choices"][0]["text"] for b, p in set(jobs)}
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda bp: _complete(server, *bp)["choices"][0]["text"], jobs))
    assert got == [alone[j] for j in jobs]


def test_bad_serve_arguments_are_one_line(run_dir, tmp_path):
    from tests.unit.test_cli import em, one_line_error

    one_line_error(em("serve", "--checkpoint", str(run_dir), "--port", "70000"), "--port 70000")
    one_line_error(em("serve", "--checkpoint", str(tmp_path / "nowhere")), "nowhere")


def test_budget_weights_are_views_into_the_parent(run_dir):
    """The engine's budgets run on the parent's own storage: no weight matrix is copied per budget."""
    from elastic_megatron.formats.hf_jobs import resolve_export_config
    from elastic_megatron.parallel import destroy_distributed
    from elastic_megatron.serve import engine as eng

    import torch

    cfg = resolve_export_config(None, str(run_dir), [])
    try:
        e = eng.Engine.load(cfg, [])
        storages = {p.untyped_storage().data_ptr() for p in e.parent.parameters()}
        parent_bytes = sum(p.numel() * p.element_size() for p in e.parent.parameters())
        small_bytes = sum(t.numel() * t.element_size() for b in e.budgets for v in b.small.values() for t in v.values()
                          if isinstance(t, torch.Tensor))
        assert small_bytes < 0.05 * parent_bytes  # one parent + the gathered per-channel vectors
        # the views cut once at load (budget_views) share the parent's storage too
        views = [t for b in e.budgets for t in (b.views["embedding"], b.views["final_norm"], b.views["output"],
                                               *(w for v in b.views["layers"] if v for w in v.values()
                                                 if isinstance(w, torch.Tensor)))]
        assert len(views) > 3 * len(e.budgets) and {t.untyped_storage().data_ptr() for t in views} <= storages
        # the hand-picked middle budget cuts query heads: its attention runs on row runs of the views
        assert any(v and v.get("qkv_runs") for b in e.budgets for v in b.views["layers"])
        seen = []
        real_sliced, real_linear = eng.sliced_linear, torch.nn.functional.linear

        def spy_sliced(x, w, rows=None, cols=None):
            seen.append(w.untyped_storage().data_ptr())
            return real_sliced(x, w, rows, cols)

        def spy_linear(x, w, bias=None):
            seen.append(w.untyped_storage().data_ptr())
            return real_linear(x, w, bias)

        eng.sliced_linear, eng.F.linear = spy_sliced, spy_linear
        try:
            for b in e.budgets:
                eng.BudgetDecoder(e.parent, e.cfg, b).step(torch.tensor([1, 2]))
        finally:
            eng.sliced_linear, eng.F.linear = real_sliced, real_linear
        # every matrix multiplied is inside a parent tensor's storage (views, not per-budget copies)
        assert len(seen) >= 10 * len(e.budgets) and set(seen) <= storages
    finally:
        destroy_distributed()
