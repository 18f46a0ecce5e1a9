"""The Ember quickstart through `kindling-server --upstream neuronpedia`, run by the real
`goodfire` 0.3.5 and `openai` SDKs with only `base_url` changed.

The server's upstream is Neuronpedia's contract double (tests/neuronpedia/contract_double.py,
address in NEURONPEDIA_DOUBLE_URL): it validates every call as Neuronpedia's schema does and
answers with fixed replies, and records what it received (/__contract/log), so these tests
also check what the server sent upstream: converted strengths, the key as x-api-key.
scripts/test-server.sh starts both, the server with --upstream-key-file holding
NEURONPEDIA_TEST_KEY.
"""

import os

import goodfire
import httpx
import pytest
from goodfire.api.exceptions import InvalidRequestException, RequestFailedException
from openai import OpenAI

URL = os.environ["KINDLING_URL"]
DOUBLE = os.environ["NEURONPEDIA_DOUBLE_URL"]
KEY = os.environ["NEURONPEDIA_TEST_KEY"]
MODEL = "meta-llama/Llama-3.3-70B-Instruct"
# Kindling steering units per multiple of maxActApprox (kindling_ember::neuronpedia::MAX_ACTS_PER_UNIT).
MAX_ACTS_PER_UNIT = 5.0

client = goodfire.Client(api_key="unused-by-this-server", base_url=URL)
HELLO = [{"role": "user", "content": "What do you think of mornings?"}]


def double_log():
    return httpx.get(f"{DOUBLE}/__contract/log").json()


def steer_calls():
    return [c for c in double_log() if c["method"] == "POST" and c["path"] == "/api/steer-chat"]


@pytest.fixture(autouse=True)
def fresh_double():
    httpx.post(f"{DOUBLE}/__contract/reset")
    httpx.post(f"{DOUBLE}/__contract/limits", json={"steer": 240, "search": 200})
    yield


@pytest.fixture(scope="module")
def pirate():
    return client.features.search("pirate speech", model=MODEL, top_k=5)


def reply(variant, stream=False, tokens=64):
    if stream:
        chunks = client.chat.completions.create(HELLO, model=variant, stream=True, max_completion_tokens=tokens, temperature=0.0)
        return "".join(c.choices[0].delta.content for c in chunks)
    response = client.chat.completions.create(HELLO, model=variant, max_completion_tokens=tokens, temperature=0.0)
    return response.choices[0].message["content"]


def test_search_finds_neuronpedia_features(pirate):
    assert 1 <= len(pirate) <= 5
    assert "pirate" in pirate[0].label.lower(), [f.label for f in pirate]
    assert all(0 <= f.index_in_sae < 65536 for f in pirate)
    # Ids are stable: the same search gives the same UUIDs.
    again = client.features.search("pirate speech", model=MODEL, top_k=5)
    assert [str(f.uuid) for f in again] == [str(f.uuid) for f in pirate]


def test_the_quickstart_steers_the_70b(pirate):
    variant = goodfire.Variant(MODEL)
    base = reply(variant)
    variant.set(pirate[0], 0.4)
    # Neuronpedia on two inference hosts: the default reply's snapshots may come first, alone.
    httpx.post(f"{DOUBLE}/__contract/stream", json={"split": True})
    steered = reply(variant, stream=True)
    assert steered != base
    assert steered == reply(variant), "streamed and whole replies agree"
    # What went upstream: one feature at 0.4 × 5 × maxActApprox, multiplier 1, the key.
    sent = steer_calls()[-1]
    feature = sent["body"]["features"][0]
    max_act = httpx.get(f"{DOUBLE}/api/feature/llama3.3-70b-it/50-resid-post-gf/{pirate[0].index_in_sae}").json()["maxActApprox"]
    assert feature["index"] == pirate[0].index_in_sae
    assert feature["strength"] == pytest.approx(0.4 * MAX_ACTS_PER_UNIT * max_act, rel=1e-4)
    assert sent["body"]["strength_multiplier"] == 1
    assert sent["x_api_key"] == KEY
    variant.reset()
    assert reply(variant) == base


def test_a_subtle_value_changes_little_and_a_clear_one_steers(pirate):
    variant = goodfire.Variant(MODEL)
    base = reply(variant)
    variant.set(pirate[0], 0.05)
    assert reply(variant) == base, "below the visible zone, the double's reply is unchanged"
    variant.set(pirate[0], 0.3)
    assert reply(variant) != base


def test_inspect_reads_activations_on_neuronpedia(pirate):
    conv = HELLO + [{"role": "assistant", "content": "Arr matey, the pirate ship sails at dawn!"}]
    context = client.features.inspect(conv, model=MODEL)
    assert len(context.tokens) >= 5
    fired = {f.feature.index_in_sae for token in context.tokens for f in token.inspect(k=10)}
    assert pirate[0].index_in_sae in fired
    looked = client.features.lookup([pirate[0].index_in_sae], model=MODEL)
    assert looked[pirate[0].index_in_sae].label == pirate[0].label


def test_what_neuronpedia_cannot_do_is_refused_by_name(pirate):
    variant = goodfire.Variant(MODEL)
    variant.set_when(pirate[0] > 0.5, {pirate[0]: 0.3})
    with pytest.raises((RequestFailedException, InvalidRequestException), match="set_when"):
        reply(variant)
    with pytest.raises((RequestFailedException, InvalidRequestException), match="Neuronpedia"):
        client.features.contrast(dataset_1=[HELLO], dataset_2=[HELLO], model=MODEL, top_k=5)
    with pytest.raises((RequestFailedException, InvalidRequestException), match="logits"):
        client.chat.logits(HELLO, model=MODEL, top_k=5)
    assert not steer_calls(), "nothing refused here reached Neuronpedia"


def test_openai_sdk_streams_through_the_upstream(pirate):
    openai = OpenAI(base_url=f"{URL}/api/inference/v1", api_key="unused")
    variant = goodfire.Variant(MODEL)
    variant.set(pirate[0], 0.4)
    stream = openai.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, max_tokens=64, temperature=0, extra_body={"controller": variant.controller.json()}
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == reply(variant)
    assert [m.id for m in openai.models.list().data] == [MODEL]
    # Kindling's extension: who answers, and what it cannot do (the page greys those out).
    provider = httpx.get(f"{URL}/api/inference/v1/models").json()["kindling_provider"]
    assert provider["name"] == "Neuronpedia" and provider["source"] == "llama3.3-70b-it/50-resid-post-gf"
    assert "logits" in provider["limitations"]["/chat-attribution/compute-logits"]


def test_limits_and_the_rate_limit_are_explained():
    raw = httpx.Client(base_url=f"{URL}/api/inference/v1", timeout=30)
    long = [{"role": "user", "content": "x" * 9000}]
    answer = raw.post("/chat/completions", json={"model": MODEL, "messages": long})
    assert answer.status_code == 422 and "8192" in answer.json()["detail"], answer.text
    short = raw.get("/features/search", params={"query": "ab", "model": MODEL})
    assert short.status_code == 422 and "at least 3" in short.json()["detail"]
    # Neuronpedia's own 429 (its limiter: here one steer call an hour) comes back as 429.
    httpx.post(f"{DOUBLE}/__contract/limits", json={"steer": 1})
    body = {"model": MODEL, "messages": HELLO, "max_completion_tokens": 8}
    assert raw.post("/chat/completions", json=body).status_code == 200
    limited = raw.post("/chat/completions", json=body)
    assert limited.status_code == 429, limited.text
    assert "rate limit" in limited.json()["detail"]
