"""The Ember quickstart, run by the real `goodfire` 0.3.5 and `openai` SDKs against
kindling-server (started by scripts/test-server.sh, address in KINDLING_URL).

The sync goodfire Client is used throughout, in the main thread: the SDK's async client has
known bugs around errors and aborts (goodfire-api.md §1.6), and its sync client cannot run
off the main thread (§1.7). Generations are greedy (temperature 0) where two outputs are
compared, so a difference comes from the variant and not from sampling.
"""

import json
import os

import goodfire
import httpx
import pytest
from goodfire.api.exceptions import InvalidRequestException, NotFoundException, RequestFailedException
from openai import OpenAI

URL = os.environ["KINDLING_URL"]
MODEL = os.environ.get("KINDLING_MODEL_NAME", "HuggingFaceTB/SmolLM2-135M-Instruct")
SAE_SIZE = 65536  # what the SDK sizes vectors to for any model but the 70B

client = goodfire.Client(api_key="kindling-test", base_url=URL)

HELLO = [{"role": "user", "content": "Hi! Tell me about your favourite animal."}]
# What the goodfire SDK puts before a conversation that has no system message.
SDK_SYSTEM = {"role": "system", "content": "You are a helpful assistant who should follow the users requests. Be brief and to the point, but also be friendly and engaging."}


def reply(variant, messages=HELLO, tokens=24, stream=False):
    """The assistant's text, greedy."""
    if stream:
        chunks = client.chat.completions.create(
            messages, model=variant, stream=True, max_completion_tokens=tokens, temperature=0.0
        )
        return "".join(c.choices[0].delta.content for c in chunks)
    response = client.chat.completions.create(messages, model=variant, max_completion_tokens=tokens, temperature=0.0)
    return response.choices[0].message["content"]


@pytest.fixture(scope="module")
def funny():
    return client.features.search("funny", model=MODEL, top_k=10)


def test_streaming_and_non_streaming_generation_agree():
    variant = goodfire.Variant(MODEL)
    streamed = reply(variant, stream=True)
    whole = reply(variant)
    assert len(streamed.split()) >= 5, streamed
    assert streamed == whole


def test_sampled_generation_follows_the_seed():
    variant = goodfire.Variant(MODEL)
    texts = [
        client.chat.completions.create(HELLO, model=variant, max_completion_tokens=16, seed=s).choices[0].message["content"]
        for s in (1, 1, 2)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_search_finds_humour_features(funny):
    assert len(funny) == 10
    labels = " ".join(f.label.lower() for f in funny)
    assert any(w in labels for w in ("fun", "joke", "humor", "humour", "laugh", "comed")), labels
    assert all(0 <= f.index_in_sae < SAE_SIZE for f in funny)


def test_variant_set_changes_the_output(funny):
    variant = goodfire.Variant(MODEL)
    base = reply(variant)
    variant.set(funny[0], 1.0)
    steered = reply(variant)
    assert steered != base
    variant.reset()
    assert reply(variant) == base


def test_neighbors_exclude_the_feature_and_come_sorted(funny):
    near = client.features.neighbors(funny[0], model=MODEL, top_k=5)
    assert len(near) == 5
    assert funny[0].index_in_sae not in [f.index_in_sae for f in near]
    group = client.features.neighbors(funny[0:2], model=MODEL, top_k=3)
    assert len(group) == 3


def test_contrast_then_rerank():
    plain = [
        [{"role": "user", "content": "Tell me about cats."}, {"role": "assistant", "content": "Cats are small domesticated mammals kept as pets."}],
        [{"role": "user", "content": "What is rain?"}, {"role": "assistant", "content": "Rain is water that falls from clouds as drops."}],
    ]
    jokes = [
        [{"role": "user", "content": "Tell me about cats."}, {"role": "assistant", "content": "Why did the cat sit on the computer? To keep an eye on the mouse! Ha ha!"}],
        [{"role": "user", "content": "What is rain?"}, {"role": "assistant", "content": "Rain is just clouds that could not hold it in any longer. What a joke, haha!"}],
    ]
    to_remove, to_add = client.features.contrast(dataset_1=plain, dataset_2=jokes, model=MODEL, top_k=20)
    assert len(to_add) == 20 and len(to_remove) == 20
    assert not {f.index_in_sae for f in to_add} & {f.index_in_sae for f in to_remove}
    # The joke side's features are about what differs: jokes, laughter, exclamations.
    joke_words = ("joke", "laugh", "fun", "humor", "ha", "!", "comed", "pun")
    assert any(w in f.label.lower() for f in to_add for w in joke_words), [f.label for f in to_add]
    best = client.features.rerank(features=to_add, query="funny", model=MODEL, top_k=5)
    assert len(best) == 5
    assert {f.index_in_sae for f in best} <= {f.index_in_sae for f in to_add}
    variant = goodfire.Variant(MODEL)
    variant.set(best[0, 1], 0.6)
    assert len(variant.edits) == 2


def strongest_prompt_feature():
    """A feature that fires strongly on HELLO's own tokens."""
    context = client.features.inspect(HELLO, model=MODEL)
    return context.top(k=1)[0].feature


def test_set_when_and_abort_when(funny):
    pirate = client.features.search("talk like a pirate", model=MODEL, top_k=1)
    variant = goodfire.Variant(MODEL)
    variant.set_when(pirate[0] > 0.75, {funny[0]: 0.7})
    assert reply(variant)
    # A condition that holds on the prompt itself aborts before any reply.
    fires = strongest_prompt_feature()
    variant.abort_when(fires > 0.1)
    with pytest.raises(goodfire.InferenceAbortedException):
        reply(variant)
    with pytest.raises(goodfire.InferenceAbortedException):
        reply(variant, stream=True)
    # A condition that never holds changes nothing.
    never = goodfire.Variant(MODEL)
    never.abort_when(fires > 1000)
    assert reply(never) == reply(goodfire.Variant(MODEL))


def test_set_when_fires_and_steers(funny):
    fires = strongest_prompt_feature()
    variant = goodfire.Variant(MODEL)
    variant.set_when(fires > 0.1, {funny[0]: 1.0})
    always = goodfire.Variant(MODEL)
    always.set(funny[0], 1.0)
    # The condition holds on the prompt, so the edit applies from there on, like a plain edit
    # from that token.
    assert reply(variant) != reply(goodfire.Variant(MODEL))


def test_a_stream_says_which_rule_fired_at_which_reply_token(funny):
    """`kindling_rules_fired` (an extra chunk key the SDKs ignore) names the rule and the
    reply token whose features first met its condition."""
    api = f"{URL}/api/inference/v1"
    http = httpx.Client(timeout=300)
    messages = [SDK_SYSTEM] + HELLO  # as the SDK sends them, so its reply can be compared
    body = {"model": MODEL, "messages": messages, "max_completion_tokens": 12, "temperature": 0}
    base = http.post(f"{api}/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    conversation = messages + [{"role": "assistant", "content": base}]
    tokens = http.post(f"{api}/chat-attribution/compute-features", json={"model": MODEL, "messages": conversation}).json()["tokens"]
    start = max(i for i, t in enumerate(tokens) if t["token"] == "<|im_start|>") + 4  # after "<|im_start|>assistant\n"
    reply_tokens = tokens[start:-2]  # without "<|im_end|>\n"
    # A feature that first fires on reply token k, at least 3x stronger than anywhere before.
    def earlier_max(j, position):
        return max((a["activation_strength"] for t in tokens[:position] for a in t["attributions"] if a["index_in_sae"] == j), default=0.0)
    k, feature, strength = next(
        (k, a["index_in_sae"], a["activation_strength"])
        for k in range(1, len(reply_tokens))
        for a in reply_tokens[k]["attributions"]
        if a["activation_strength"] > 0.3 and earlier_max(a["index_in_sae"], start + k) < a["activation_strength"] / 3
    )
    trigger = client.features.lookup([feature], model=MODEL)[feature]
    variant = goodfire.Variant(MODEL)
    variant.set_when(trigger > strength / 2, {funny[0]: 0.5})
    fired, text = [], ""
    with http.stream("POST", f"{api}/chat/completions", json={**body, "stream": True, "controller": variant.controller.json()}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                fired += chunk.get("kindling_rules_fired", [])
                text += chunk["choices"][0]["delta"]["content"]
    assert fired == [{"rule": 0, "token_index": k, "token": reply_tokens[k]["token"]}]
    # Up to that token the reply is the base model's; the SDK still reads the stream.
    assert text.startswith("".join(t["token"] for t in reply_tokens[: k + 1]))
    assert reply(variant, messages=messages, tokens=12, stream=True) == text


def test_autosteer_edits_change_the_output():
    variant = goodfire.Variant(MODEL)
    base = reply(variant)
    edits = client.features.AutoSteer(specification="be funny", model=variant)
    assert len(edits) >= 1
    variant.set(edits)
    assert len(variant.edits) >= 1
    assert reply(variant) != base


def test_auto_conditional(funny):
    cond = client.features.AutoConditional("pirates", model=MODEL)
    variant = goodfire.Variant(MODEL)
    variant.set_when(cond, {funny[0]: 0.5})
    assert reply(variant)


def test_inspect_lookup_top_and_tokens():
    conv = HELLO + [{"role": "assistant", "content": "I love dolphins because they are playful and smart."}]
    context = client.features.inspect(conv, model=MODEL)
    assert len(context.tokens) >= 20
    top = context.top(k=10)
    assert len(top) == 10
    looked = context.lookup()
    assert looked and all(f.label is not None for f in looked.values())
    per_token = context.tokens[-3].inspect(k=5)
    assert 1 <= len(per_token) <= 5
    matrix = context.matrix()
    assert matrix.shape == (len(context.tokens), SAE_SIZE)
    vector = top.vector()
    assert vector.shape == (SAE_SIZE,) and vector.max() > 0
    acts = client.features.activations(conv, model=MODEL)
    assert acts.shape == matrix.shape
    assert abs(acts - matrix).max() < 1e-4


def test_logits():
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    logits = client.chat.logits(conv, model=MODEL, top_k=5)
    values = list(logits.logits.values())
    assert len(values) == 5 and values == sorted(values, reverse=True)
    only = client.chat.logits(conv, model=MODEL, top_k=2, filter_vocabulary=["The", "Paris"])
    assert set(only.logits) == {"The", "Paris"}


def test_variant_json_round_trip(funny):
    variant = goodfire.Variant(MODEL)
    variant.set(funny[0], 0.6)
    saved = json.dumps(variant.json())
    loaded = goodfire.Variant.from_json(saved)
    assert reply(loaded, stream=True) == reply(variant, stream=True)


def test_openai_sdk_streams_with_a_controller(funny):
    openai = OpenAI(base_url=f"{URL}/api/inference/v1", api_key="kindling-test")
    variant = goodfire.Variant(MODEL)
    variant.set(funny[0], 1.0)

    def ask(extra):
        stream = openai.chat.completions.create(
            model=MODEL, messages=[SDK_SYSTEM] + HELLO, stream=True, max_tokens=24, temperature=0, extra_body=extra
        )
        return "".join(c.choices[0].delta.content or "" for c in stream)

    steered = ask({"controller": variant.controller.json()})
    assert steered == reply(variant)
    assert steered != ask({})
    models = openai.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_sdk_errors_are_clear():
    with pytest.raises(NotFoundException, match="unknown model"):
        client.features.search("funny", model="no/such-model", top_k=3)
    with pytest.raises(RequestFailedException, match="does not exist"):
        client.features.lookup([10**6], model=MODEL)
    with pytest.raises(RequestFailedException, match="max_completion_tokens"):
        client.chat.completions.create(HELLO, model=goodfire.Variant(MODEL), max_completion_tokens=-5)
    bad = goodfire.Variant(MODEL)
    bad.set(goodfire.Feature(uuid="0" * 32, label="x", index_in_sae=10**6), 0.5)
    with pytest.raises((RequestFailedException, InvalidRequestException), match="does not exist"):
        reply(bad)


def test_logit_attribution_finds_features_whose_ablation_lowers_the_token():
    conv = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is Paris."}]
    # The index is into the templated conversation, as compute-features lists it.
    context = client.features.inspect(conv, model=MODEL)
    paris = max(i for i, t in enumerate(context.tokens) if "Paris" in str(t))
    result = client.features.attribute(conv, paris, model=MODEL)
    assert result.num_input_tokens == len(context.tokens)
    assert result.features, "no feature's ablation lowered the logit of ' Paris'"
    values = [a.value for a in result.features]
    assert values == sorted(values, reverse=True) and values[0] > 0
    assert all(a.feature is not None for a in result.features)


def test_contrastive_stimulus_feeds_contrast():
    plain, asked = client.features.generate_contrastive_stimulus("pirate speech")
    assert len(plain) == len(asked) >= 2
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in plain + asked)
    _, toward = client.features.contrast(dataset_1=plain, dataset_2=asked, model=MODEL, top_k=5)
    assert len(toward) == 5
