"""The live smoke test: the steps Kindling's Neuronpedia provider takes, against the real
service, plus what the service actually enforces of the limits Kindling checks before sending
(kindling_ember::neuronpedia::RemoteLimits; some are unconfirmed in the reference).

Skipped unless NEURONPEDIA_LIVE=1 (it needs the internet, and spends a few of the service's
rate-limited calls). Run it with scripts/neuronpedia-live-smoke.sh, which also drives
`kindling-server --upstream neuronpedia` with the goodfire SDK. NEURONPEDIA_URL points it
elsewhere (the contract double, to check this script itself); KINDLING_URL, when set, is a
kindling-server whose upstream is the same service.

Prints one line per step and a table of the limits as observed; exits non-zero if a step
that must work does not.
"""

import json
import os
import sys
import urllib.error
import urllib.request

BASE = os.environ.get("NEURONPEDIA_URL", "https://www.neuronpedia.org").rstrip("/")
MODEL, SOURCE = os.environ.get("NEURONPEDIA_PAIR", "llama3.3-70b-it/50-resid-post-gf").split("/", 1)
ORIGIN = "https://kindling.example"  # what a page on another origin sends


def call(method, path, body=None, headers=None):
    """(status, headers, parsed body or text) of one call; never raises for an HTTP status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, method=method)
    request.add_header("Origin", ORIGIN)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            status, head, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, dict(e.headers), e.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, head, json.loads(text)
    except ValueError:
        return status, head, text


def header(head, name):
    return next((v for k, v in head.items() if k.lower() == name.lower()), None)


failures = []
observed = []


def step(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        failures.append(name)


def steer_body(features, n_tokens=16, content="What do you think of mornings?"):
    return {
        "modelId": MODEL, "defaultChatMessages": [{"role": "user", "content": content}],
        "steeredChatMessages": [{"role": "user", "content": content}], "features": features,
        "temperature": 0, "n_tokens": n_tokens, "seed": 42, "strength_multiplier": 1,
        "steer_special_tokens": False, "stream": False, "steer_method": "SIMPLE_ADDITIVE",
    }


def main():
    if os.environ.get("NEURONPEDIA_LIVE") != "1" and "NEURONPEDIA_URL" not in os.environ:
        print("skipped: set NEURONPEDIA_LIVE=1 to run the live Neuronpedia smoke test")
        return 0
    print(f"Neuronpedia at {BASE}, {MODEL}/{SOURCE}")

    # 1. Explanation search, as the Features tab and AutoSteer call it.
    status, head, found = call("POST", "/api/explanation/search", {"modelId": MODEL, "layers": [SOURCE], "query": "pirate speech"})
    hits = found.get("results", []) if isinstance(found, dict) else []
    step("explanation search answers with hits", status == 200 and bool(hits), f"HTTP {status}, {len(hits)} hits")
    step("CORS: Access-Control-Allow-Origin is *", header(head, "access-control-allow-origin") == "*", str(header(head, "access-control-allow-origin")))
    if not hits:
        return 1
    index = int(hits[0]["index"])
    print(f"     top hit #{index}: {hits[0].get('description')}")

    # 2. The feature's dashboard: maxActApprox converts strengths.
    status, _, neuron = call("GET", f"/api/feature/{MODEL}/{SOURCE}/{index}")
    max_act = neuron.get("maxActApprox") if isinstance(neuron, dict) else None
    step("feature dashboard has maxActApprox and activations", status == 200 and bool(max_act) and bool(neuron.get("activations")), f"maxActApprox {max_act}")

    # 3. steer-chat at 0.4 Kindling units (2 × maxActApprox): base and steered in one call.
    strength = 0.4 * 5 * float(max_act or 40)
    status, head, reply = call("POST", "/api/steer-chat", steer_body([{"modelId": MODEL, "layer": SOURCE, "index": index, "strength": strength}]))
    ok = status == 200 and isinstance(reply, dict) and reply.get("STEERED") and reply.get("DEFAULT")
    step("steer-chat returns STEERED and DEFAULT", bool(ok), f"HTTP {status}")
    if ok:
        last = lambda side: side["chatTemplate"][-1]["content"]
        print(f"     default: {last(reply['DEFAULT'])[:120]!r}")
        print(f"     steered: {last(reply['STEERED'])[:120]!r}")
        observed.append(("requests left in the steer window (body `limit`)", str(reply.get("limit"))))

    # 4. Activations on text, as the token overlay reads them.
    status, _, topk = call("POST", "/api/search-topk-by-token", {
        "modelId": MODEL, "source": SOURCE, "text": "Arr matey, the pirate ship sails at dawn!",
        "numResults": 10, "ignoreBos": True, "densityThreshold": 0.01})
    tokens = topk.get("results", []) if isinstance(topk, dict) else []
    step("search-topk-by-token lists tokens", status == 200 and len(tokens) >= 5, f"HTTP {status}, {len(tokens)} tokens")

    # 5. The limits Kindling checks before sending: does the service enforce them?
    for what, body in [
        ("n_tokens 1025 (Kindling's limit 1024)", steer_body([], n_tokens=1025)),
        ("prompt of 8193 characters (Kindling's limit 8192)", steer_body([], content="x" * 8193)),
        ("prompt of 3000 characters (inference TOKEN_LIMIT?)", steer_body([], content="word " * 600)),
    ]:
        status, _, answer = call("POST", "/api/steer-chat", body)
        message = answer.get("message") if isinstance(answer, dict) else str(answer)[:120]
        observed.append((what, f"HTTP {status} {message!r}"))
    status, head, _ = call("OPTIONS", "/api/steer-chat", headers={
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-api-key"})
    observed.append(("preflight asking for x-api-key: allowed headers", str(header(head, "access-control-allow-headers"))))

    # 6. Through kindling-server --upstream neuronpedia, with the goodfire SDK.
    if os.environ.get("KINDLING_URL"):
        import goodfire

        client = goodfire.Client(api_key="unused", base_url=os.environ["KINDLING_URL"])
        name = "meta-llama/Llama-3.3-70B-Instruct"
        pirate = client.features.search("pirate speech", model=name, top_k=3)
        variant = goodfire.Variant(name)
        variant.set(pirate[0], 0.4)
        text = client.chat.completions.create([{"role": "user", "content": "Hi!"}], model=variant, max_completion_tokens=24, temperature=0.0)
        step("goodfire SDK quickstart through kindling-server", bool(text.choices[0].message["content"]), repr(text.choices[0].message["content"][:100]))

    print("\nwhat the service enforces, observed now:")
    for what, seen in observed:
        print(f"  | {what} | {seen} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
