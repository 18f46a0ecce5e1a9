"""kindling-server under bad input and load (raw HTTP, no SDK): every fault is a 4xx with a
JSON message, the server keeps serving, concurrency is bounded with 429 beyond the queue,
clients that leave free their slot, and memory stays bounded.

Started by scripts/test-server.sh with --max-running 2 --max-queued 6 and an API key
(KINDLING_API_KEY; KINDLING_PID is the server's pid, for its resident memory)."""

import json
import os
import threading
import time

import httpx as _httpx

URL = os.environ["KINDLING_URL"]
API = f"{URL}/api/inference/v1"
MODEL = os.environ.get("KINDLING_MODEL_NAME", "HuggingFaceTB/SmolLM2-135M-Instruct")
HELLO = [{"role": "user", "content": "Say hello."}]
KEY = os.environ["KINDLING_API_KEY"]
# Every request below carries the key, except where a test leaves it out.
httpx = _httpx.Client(headers={"authorization": f"Bearer {KEY}"}, timeout=300)


def rss_mib():
    with open(f"/proc/{os.environ['KINDLING_PID']}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def health():
    return httpx.get(f"{URL}/health").json()


def idle_soon(seconds=10):
    """Whether every generation slot is free within `seconds` (a slot is released just after
    its stream's last bytes are sent)."""
    deadline = time.time() + seconds
    while health()["running"] and time.time() < deadline:
        time.sleep(0.1)
    return health()["running"] == 0


def still_serving():
    r = httpx.post(f"{API}/features/lookup", json={"indices": [1], "model": MODEL})
    assert r.status_code == 200, r.text


def expect(status, response):
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["detail"] and body["error"]["message"], body
    still_serving()
    return body["detail"]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving():
    chat = f"{API}/chat/completions"
    json_headers = {"content-type": "application/json"}
    expect(400, httpx.post(chat, content=b'{"messages": [', headers=json_headers))
    expect(415, httpx.post(chat, content=b"messages=hi", headers={"content-type": "text/plain"}))
    expect(422, httpx.post(chat, json={"messages": "hello", "model": MODEL}))
    expect(422, httpx.post(chat, json={"messages": HELLO}))
    assert "max_completion_tokens" in expect(422, httpx.post(chat, json={"messages": HELLO, "model": MODEL, "max_tokens": -1}))
    assert "unknown model" in expect(404, httpx.post(chat, json={"messages": HELLO, "model": "gpt-4"}))
    assert "role" in expect(422, httpx.post(chat, json={"messages": [{"role": "tool", "content": "x"}], "model": MODEL}))
    bad_controller = {"interventions": [{"mode": "boost", "features": {"features": []}, "value": 1}], "scopes": []}
    assert "mode" in expect(422, httpx.post(chat, json={"messages": HELLO, "model": MODEL, "controller": bad_controller}))
    absurd = {"interventions": [{"mode": "nudge", "features": {"features": [{"index_in_sae": 1}]}, "value": 1e30}], "scopes": []}
    expect(422, httpx.post(chat, json={"messages": HELLO, "model": MODEL, "controller": absurd}))
    huge = {"messages": [{"role": "user", "content": "x" * (3 << 20)}], "model": MODEL}
    assert httpx.post(chat, json=huge).status_code == 413
    still_serving()
    long_prompt = {"messages": [{"role": "user", "content": "word " * 6000}], "model": MODEL}
    assert "tokens" in expect(422, httpx.post(chat, json=long_prompt))
    assert "UUID" in expect(422, httpx.get(f"{API}/features/", params={"feature_id": "not-a-uuid"}))
    assert "feature id" in expect(422, httpx.post(f"{API}/features/rerank", json={"query": "x", "model": MODEL, "top_k": 3, "feature_ids": ["12345678-1234-4234-8234-123456789012"]}))
    expect(422, httpx.get(f"{API}/features/search", params={"query": "funny", "model": MODEL, "perPage": "lots"}))
    expect(422, httpx.post(f"{API}/attributions/neighbors", json={"feature_indices": [-1], "model": MODEL, "top_k": 3}))
    expect(422, httpx.post(f"{API}/chat-attribution/contrast", json={"dataset_1": [], "dataset_2": [], "model": MODEL}))


def test_features_list_answers_ids_in_both_forms():
    found = httpx.get(f"{API}/features/search", params={"query": "food", "model": MODEL, "perPage": 2}).json()["features"]
    ids = [f["id"] for f in found]
    dashed, plain = ids[0], ids[1].replace("-", "").upper()
    listed = httpx.get(f"{API}/features/", params=[("feature_id", dashed), ("feature_id", plain)]).json()["features"]
    assert sorted(f["index_in_sae"] for f in listed) == sorted(f["index_in_sae"] for f in found)


def stream(max_tokens, results, i, leave_after=None):
    body = {"messages": HELLO, "model": MODEL, "stream": True, "max_completion_tokens": max_tokens, "temperature": 0}
    try:
        with _httpx.stream("POST", f"{API}/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=300) as r:
            if r.status_code != 200:
                r.read()
                results[i] = r.status_code
                return
            events = 0
            for chunk in r.iter_bytes():
                assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n"), chunk
                if chunk == b"data: [DONE]\n\n":
                    results[i] = "done"
                    return
                json.loads(chunk[6:])
                events += 1
                if leave_after is not None and events >= leave_after:
                    results[i] = "left"
                    return
            results[i] = "cut"
    except Exception as e:  # noqa: BLE001 - reported in the assertion
        results[i] = repr(e)


def test_64_concurrent_streams_complete_or_get_429_and_memory_stays_bounded():
    before = rss_mib()
    results = [None] * 64
    threads = [threading.Thread(target=stream, args=(6, results, i)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = rss_mib()
    done, busy = results.count("done"), results.count(429)
    print(f"64 streams: {done} completed, {busy} got 429; resident memory {before:.0f} -> {after:.0f} MiB")
    assert done + busy == 64, results
    assert done >= 8  # 2 running + 6 queued at least
    assert after < before + 256
    assert idle_soon()


def test_clients_that_leave_free_their_slot():
    results = [None] * 2
    threads = [threading.Thread(target=stream, args=(1000, results, i, 2)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["left", "left"], results
    assert idle_soon(), "a departed client's generation kept its slot"
    again = [None]
    stream(4, again, 0)
    assert again == ["done"]


def test_api_keys_are_checked():
    body = {"indices": [1], "model": MODEL}
    missing = _httpx.post(f"{API}/features/lookup", json=body)
    assert missing.status_code == 401 and "API key" in missing.json()["detail"]
    wrong = _httpx.post(f"{API}/features/lookup", json=body, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    still_serving()


def test_cors_preflight_allows_the_sdk_headers():
    r = _httpx.options(
        f"{API}/chat/completions",
        headers={
            "origin": "http://localhost:9999",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type,x-base-url",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    allowed = r.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in ("authorization", "content-type", "x-base-url"))


def test_static_files_are_served_beside_the_api():
    manifest = _httpx.get(f"{URL}/sae/manifest.json")
    assert manifest.status_code == 200 and manifest.json()["files"]
    assert _httpx.get(f"{URL}/no/such/file").status_code == 404
