"""Tests of the Neuronpedia contract double (contract_double.py), itself a contract double of
Neuronpedia's API, never the real service.

Run: cd tests/neuronpedia && python3 -m unittest -q test_contract_double
"""

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contract_double as cd  # noqa: E402

LLAMA, LLAMA_SRC = "llama3.3-70b-it", "50-resid-post-gf"
GEMMA, GEMMA_SRC = "gemma-2-2b", "20-gemmascope-res-16k"
PIRATE = cd.FIXTURES[(LLAMA, LLAMA_SRC, "2810")]


def steer_body(**over):
    body = {
        "modelId": LLAMA,
        "defaultChatMessages": [{"role": "user", "content": "How should I plan my mornings?"}],
        "steeredChatMessages": [{"role": "user", "content": "How should I plan my mornings?"}],
        "features": [{"modelId": LLAMA, "layer": LLAMA_SRC, "index": 2810, "strength": 28.4}],
        "temperature": 0.5,
        "n_tokens": 64,
        "seed": 16,
        "strength_multiplier": 1,
        "steer_special_tokens": True,
    }
    body.update(over)
    return body


def feature(index=2810, strength=28.4, model=LLAMA, layer=LLAMA_SRC):
    return {"modelId": model, "layer": layer, "index": index, "strength": strength}


class Reply:
    def __init__(self, status, headers, data):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers}
        self.data = data

    def json(self):
        return json.loads(self.data)

    def frames(self):
        chunks = [c for c in self.data.decode("utf-8").split("\n\n") if c]
        assert all(c.startswith("data: ") for c in chunks), chunks
        return [json.loads(c[len("data: "):]) for c in chunks]


SERVER = None


def setUpModule():
    global SERVER
    SERVER = cd.start_server()


def tearDownModule():
    SERVER.shutdown()
    SERVER.server_close()


class DoubleTest(unittest.TestCase):
    @property
    def host(self):
        return SERVER.server_address[0]

    @property
    def port(self):
        return SERVER.server_address[1]

    def setUp(self):
        self.call("POST", "/__contract/limits", {"steer": 240, "search": 200})
        self.call("POST", "/__contract/reset", {})

    def call(self, method, path, body=None, raw=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode("utf-8"))
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        reply = Reply(resp.status, resp.getheaders(), resp.read())
        conn.close()
        return reply

    def post(self, path, body=None, **kw):
        return self.call("POST", path, body, **kw)

    def steer(self, **over):
        return self.post("/api/steer-chat", steer_body(**over))

    def assert_400(self, reply, fragment):
        self.assertEqual(reply.status, 400, reply.data)
        self.assertEqual(list(reply.json()), ["message"])
        self.assertIn(fragment, reply.json()["message"])

    def steered_text(self, reply):
        self.assertEqual(reply.status, 200, reply.data)
        return reply.json()["STEERED"]["chatTemplate"][-1]["content"]

    def default_text(self, reply):
        return reply.json()["DEFAULT"]["chatTemplate"][-1]["content"]


class SteerChatShape(DoubleTest):
    def test_happy_path_shape(self):
        r = self.steer()
        self.assertEqual(r.status, 200, r.data)
        self.assertTrue(r.headers["content-type"].startswith("application/json"))
        body = r.json()
        self.assertEqual(list(body), ["STEERED", "DEFAULT", "id", "shareUrl", "limit", "settings"])
        for kind in ("STEERED", "DEFAULT"):
            out = body[kind]
            self.assertEqual(set(out), {"raw", "chatTemplate", "logprobs"})
            self.assertIsNone(out["logprobs"])
            self.assertTrue(out["raw"].startswith(
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow should I plan my mornings?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"))
            self.assertEqual(out["chatTemplate"][0], {"role": "user", "content": "How should I plan my mornings?"})
            self.assertEqual(out["chatTemplate"][-1]["role"], "assistant")
            self.assertTrue(out["raw"].endswith(out["chatTemplate"][-1]["content"] + "<|eot_id|>"))
        self.assertEqual(body["shareUrl"], f"https://www.neuronpedia.org/steer/{body['id']}")
        self.assertEqual(body["limit"], r.headers["x-limit-remaining"])
        self.assertEqual(body["settings"], {
            "temperature": 0.5, "n_tokens": 64, "freq_penalty": 1, "seed": 16, "strength_multiplier": 1,
            "steer_special_tokens": True, "steer_method": "SIMPLE_ADDITIVE"})

    def test_gemma_happy_path(self):
        r = self.steer(modelId=GEMMA, features=[feature(1208, 10, GEMMA, GEMMA_SRC)], n_tokens=256)
        self.assertEqual(r.status, 200, r.data)
        self.assertTrue(r.json()["DEFAULT"]["raw"].startswith("<bos><start_of_turn>user\n"))

    def test_empty_features_allowed_and_steered_is_null(self):
        r = self.steer(features=[])
        self.assertEqual(r.status, 200, r.data)
        body = r.json()
        self.assertIsNone(body["STEERED"])
        self.assertIsNone(body["id"])
        self.assertNotIn("shareUrl", body)
        self.assertIsNotNone(body["DEFAULT"])

    def test_unknown_extra_fields_allowed_and_numeric_strings_cast(self):
        r = self.steer(somethingElse={"x": 1}, temperature="0.5", n_tokens="12")
        self.assertEqual(r.status, 200, r.data)
        self.assertEqual(r.json()["settings"]["temperature"], 0.5)
        self.assertEqual(r.json()["settings"]["n_tokens"], 12)

    def test_boundaries_accepted(self):
        for over in ({"n_tokens": 1024}, {"temperature": 2}, {"temperature": 0}, {"seed": -100000000},
                     {"strength_multiplier": 10}, {"features": [feature(strength=-300)]},
                     {"steer_method": "PROJECTION_CAP"},
                     {"defaultChatMessages": [{"role": "developer", "content": "x" * 8192}]}):
            self.assertEqual(self.steer(**over).status, 200, over)
        r = self.steer(modelId=GEMMA, features=[], n_tokens=256)
        self.assertEqual(r.status, 200, r.data)


class SteerChatRejections(DoubleTest):
    def test_missing_model_id(self):
        body = steer_body()
        del body["modelId"]
        self.assert_400(self.post("/api/steer-chat", body), "modelId is a required field")

    def test_bad_role(self):
        r = self.steer(defaultChatMessages=[{"role": "bot", "content": "hi"}])
        self.assert_400(r, "defaultChatMessages[0].role must be one of the following values: "
                           "user, assistant, system, model, developer")

    def test_empty_content_is_required(self):
        self.assert_400(self.steer(steeredChatMessages=[{"role": "user", "content": ""}]),
                        "steeredChatMessages[0].content is a required field")

    def test_strength_below_minus_300(self):
        self.assert_400(self.steer(features=[feature(strength=-301)]),
                        "features[0].strength must be greater than or equal to -300")

    def test_temperature_above_2(self):
        self.assert_400(self.steer(temperature=2.5), "temperature must be less than or equal to 2")

    def test_n_tokens_zero(self):
        self.assert_400(self.steer(n_tokens=0), "n_tokens must be greater than or equal to 1")

    def test_n_tokens_not_integer(self):
        self.assert_400(self.steer(n_tokens=1.5), "n_tokens must be an integer")

    def test_n_tokens_1025_llama(self):
        self.assert_400(self.steer(n_tokens=1025), "For large LLM models the max n_tokens is 1024")

    def test_n_tokens_257_gemma(self):
        self.assert_400(self.steer(modelId=GEMMA, features=[], n_tokens=257),
                        "The max n_tokens for non-thinking models is 256")

    def test_seed_1e9(self):
        self.assert_400(self.steer(seed=1e9), "seed must be less than or equal to 100000000")

    def test_strength_multiplier_11(self):
        self.assert_400(self.steer(strength_multiplier=11), "strength_multiplier must be less than or equal to 10")

    def test_prompt_over_8192_chars_llama(self):
        msgs = [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "y" * 193}]
        self.assert_400(self.steer(defaultChatMessages=msgs), "Total conversation length exceeds")

    def test_prompt_over_2048_chars_gemma(self):
        r = self.steer(modelId=GEMMA, features=[], steeredChatMessages=[{"role": "user", "content": "x" * 2049}])
        self.assert_400(r, "Total conversation length exceeds")

    def test_prompt_chars_count_utf16_units(self):
        # "😀" is 2 UTF-16 code units: 1025 of them are 2050 > 2048
        r = self.steer(modelId=GEMMA, features=[], steeredChatMessages=[{"role": "user", "content": "😀" * 1025}])
        self.assert_400(r, "Total conversation length exceeds")

    def test_string_where_number(self):
        self.assert_400(self.steer(temperature="hot"),
                        'temperature must be a `number` type, but the final value was: `NaN` '
                        '(cast from the value `"hot"`).')

    def test_string_where_boolean(self):
        self.assert_400(self.steer(steer_special_tokens="yes"), "steer_special_tokens must be a `boolean` type")

    def test_bad_steer_method(self):
        self.assert_400(self.steer(steer_method="ADD"), "steer_method must be one of the following values")

    def test_non_json_body_is_500(self):
        r = self.post("/api/steer-chat", raw=b"this is not json")
        self.assertEqual(r.status, 500)
        self.assertEqual(r.json(), {"error": cd.SERVER_FAULT_MESSAGE, "message": cd.SERVER_FAULT_MESSAGE})

    def test_unknown_model_is_404(self):
        r = self.steer(modelId="gpt-5")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json(), {"message": cd.ERROR_NOT_FOUND_MESSAGE})

    def test_unknown_feature_is_404(self):
        for index in (65536, 99999):
            r = self.steer(features=[feature(index=index)])
            self.assertEqual(r.status, 404, index)
            self.assertEqual(r.json(), {"message": cd.ERROR_NOT_FOUND_MESSAGE})

    def test_gemma_token_cap(self):
        # 2048 chars pass the char limit but exceed the (unconfirmed) 200-token inference cap
        r = self.steer(modelId=GEMMA, features=[], defaultChatMessages=[{"role": "user", "content": "hi " * 682}])
        self.assert_400(r, "Text too long: ")


class Cors(DoubleTest):
    def assert_cors(self, reply):
        self.assertEqual(reply.headers.get("access-control-allow-origin"), "*")
        self.assertEqual(reply.headers.get("access-control-allow-methods"), "GET, POST")
        self.assertEqual(reply.headers.get("access-control-allow-headers"), "Content-Type")
        self.assertNotIn("access-control-expose-headers", reply.headers)

    def test_headers_on_responses(self):
        self.assert_cors(self.steer())
        self.assert_cors(self.steer(temperature=9))  # 400
        self.assert_cors(self.call("GET", f"/api/feature/{LLAMA}/{LLAMA_SRC}/2810"))
        self.assert_cors(self.call("GET", "/api/no-such-route"))

    def test_preflight(self):
        r = self.call("OPTIONS", "/api/steer-chat", headers={
            "Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key"})
        self.assertEqual(r.status, 204)
        self.assert_cors(r)
        self.assertNotIn("x-api-key", r.headers["access-control-allow-headers"].lower())
        self.assertEqual(r.data, b"")


class RateLimits(DoubleTest):
    def test_429_after_limit_without_cors(self):
        self.post("/__contract/limits", {"steer": 2})
        first, second, third = self.steer(), self.steer(features=[]), self.steer()
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(first.headers["x-limit-remaining"], "1")
        self.assertEqual(second.headers["x-limit-remaining"], "0")
        self.assertEqual(second.json()["limit"], "0")
        self.assertEqual(third.status, 429)
        self.assertNotIn("access-control-allow-origin", third.headers)
        self.assertNotIn("x-limit-remaining", third.headers)
        body = third.json()
        self.assertEqual(list(body), ["endpoint", "limitPerWindow", "requestWindow", "remainingRequests", "error"])
        self.assertEqual(body["endpoint"], "/api/steer")
        self.assertEqual(body["limitPerWindow"], 2)
        self.assertEqual(body["requestWindow"], "60 m")
        self.assertEqual(body["remainingRequests"], 0)
        self.assertIn("Rate limit exceeded", body["error"])
        # other prefixes are unaffected; a reset clears the window
        self.assertEqual(self.call("GET", f"/api/feature/{LLAMA}/{LLAMA_SRC}/2810").status, 200)
        self.post("/__contract/reset", {})
        self.assertEqual(self.steer().status, 200)

    def test_preflight_counts_and_is_refused_without_cors(self):
        self.post("/__contract/limits", {"steer": 1})
        self.assertEqual(self.call("OPTIONS", "/api/steer-chat").status, 204)
        r = self.call("OPTIONS", "/api/steer-chat")
        self.assertEqual(r.status, 429)
        self.assertNotIn("access-control-allow-origin", r.headers)

    def test_search_limit_covers_search_model(self):
        self.post("/__contract/limits", {"search": 1})
        q = {"modelId": LLAMA, "query": "pirate"}
        self.assertEqual(self.post("/api/explanation/search-model", q).status, 200)
        r = self.post("/api/explanation/search", dict(q, layers=[LLAMA_SRC]))
        self.assertEqual(r.status, 429)
        self.assertEqual(r.json()["endpoint"], "/api/explanation/search")

    def test_x_limit_remaining_is_most_specific_prefix(self):
        r = self.call("GET", f"/api/feature/{LLAMA}/{LLAMA_SRC}/2810")
        self.assertEqual(r.headers["x-limit-remaining"], "24999")  # /api bucket
        r = self.post("/api/activation/new", {"feature": {"modelId": LLAMA, "source": LLAMA_SRC, "index": 2810},
                                              "customText": "Arr"})
        self.assertEqual(r.headers["x-limit-remaining"], "999")  # /api/activation/new bucket

    def test_cli_overrides(self):
        server = cd.start_server(steer_limit=1, search_limit=3)
        try:
            self.assertEqual(server.state.get_limits(), {"steer": 1, "search": 3})
        finally:
            server.shutdown()
            server.server_close()


class Streaming(DoubleTest):
    def test_frames_are_cumulative_and_last_has_share_url(self):
        r = self.steer(stream=True)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["content-type"], "text/event-stream")
        frames = r.frames()
        self.assertGreaterEqual(len(frames), 4)
        self.assertLessEqual(len(frames), 7)
        for prev, cur in zip(frames, frames[1:]):
            for kind in ("STEERED", "DEFAULT"):
                self.assertTrue(cur[kind]["raw"].startswith(prev[kind]["raw"]))
                self.assertTrue(cur[kind]["chatTemplate"][-1]["content"].startswith(
                    prev[kind]["chatTemplate"][-1]["content"]))
        self.assertLess(len(frames[0]["STEERED"]["raw"]), len(frames[-1]["STEERED"]["raw"]))
        for f in frames[:-1]:
            self.assertNotIn("shareUrl", f)
        last = frames[-1]
        self.assertEqual(last["shareUrl"], f"https://www.neuronpedia.org/steer/{last['id']}")
        # the same text as the non-streamed answer
        plain = self.steer(seed=16).json()
        self.assertEqual(plain["STEERED"]["raw"], last["STEERED"]["raw"])

    def test_cached_outputs_come_back_as_plain_json(self):
        first = self.steer(stream=True).frames()[-1]
        again = self.steer(stream=True)
        self.assertTrue(again.headers["content-type"].startswith("application/json"))
        self.assertEqual(again.json()["id"], first["id"])
        self.assertEqual(again.json()["STEERED"], first["STEERED"])

    def test_stream_without_features_just_ends(self):
        r = self.steer(stream=True, features=[])
        self.assertEqual(r.status, 200)
        self.assertEqual(r.data, b"")


class SteeringSemantics(DoubleTest):
    # pirate maxActApprox 14.2: r = strength * multiplier / 14.2
    def test_small_ratio_is_unchanged(self):
        r = self.steer(features=[feature(strength=7.0)])  # r = 0.49
        self.assertEqual(self.steered_text(r), self.default_text(r))

    def test_moderate_ratio_mentions_theme(self):
        r = self.steer(features=[feature(strength=28.4)])  # r = 2
        text = self.steered_text(r)
        self.assertNotEqual(text, self.default_text(r))
        self.assertTrue(any(p.lower() in text.lower() for p in PIRATE["steered_phrases"]))
        stronger = self.steered_text(self.steer(features=[feature(strength=71)]))  # r = 5
        count = lambda t: sum(t.lower().count(p.lower()) for p in PIRATE["steered_phrases"])  # noqa: E731
        self.assertGreater(count(stronger), count(text))

    def test_huge_ratio_degenerates(self):
        r = self.steer(features=[feature(strength=30)], strength_multiplier=10, n_tokens=20)  # r = 21
        self.assertEqual(self.steered_text(r), " ".join(["arr"] * 20))
        self.assertFalse(r.json()["STEERED"]["raw"].endswith("<|eot_id|>"))

    def test_negative_ratio_avoids_theme(self):
        r = self.steer(features=[feature(strength=-50)])
        text = self.steered_text(r)
        self.assertNotEqual(text, self.default_text(r))
        self.assertFalse(any(p.lower() in text.lower() for p in PIRATE["steered_phrases"]))

    def test_n_tokens_cuts_words(self):
        r = self.steer(n_tokens=5)
        self.assertEqual(len(self.default_text(r).split(" ")), 5)
        self.assertFalse(r.json()["DEFAULT"]["raw"].endswith("<|eot_id|>"))

    def test_deterministic(self):
        a = self.steer(temperature=0.9, seed=7).json()
        self.post("/__contract/reset", {})
        b = self.steer(temperature=0.9, seed=7).json()
        self.assertEqual(a["STEERED"], b["STEERED"])
        self.assertEqual(a["DEFAULT"], b["DEFAULT"])
        self.assertNotEqual(a["id"], b["id"])  # a new saved row
        greedy = {self.steer(temperature=0, seed=s).json()["DEFAULT"]["raw"] for s in (1, 2, 3)}
        self.assertEqual(len(greedy), 1)


class ExplanationSearch(DoubleTest):
    def search(self, **over):
        body = {"modelId": LLAMA, "layers": [LLAMA_SRC], "query": "pirates"}
        body.update(over)
        return self.post("/api/explanation/search", body)

    def test_happy_path(self):
        r = self.search()
        self.assertEqual(r.status, 200, r.data)
        body = r.json()
        self.assertEqual(set(body), {"request", "results", "resultsCount", "hasMore"})
        self.assertEqual(body["request"]["query"], "pirates")
        self.assertFalse(body["hasMore"])
        self.assertEqual(body["resultsCount"], len(body["results"]))
        top = body["results"][0]
        self.assertEqual(list(top), ["modelId", "layer", "index", "description", "explanationModelName",
                                     "typeName", "cosine_similarity", "neuron"])
        self.assertEqual((top["index"], top["typeName"], top["explanationModelName"]),
                         ("2810", "np_acts-logits-general", "gemini-2.5-flash-lite"))
        self.assertGreater(top["cosine_similarity"], 0)
        neuron = top["neuron"]
        self.assertEqual(len(neuron["activations"]), 3)
        self.assertEqual(neuron["explanations"][0]["description"], PIRATE["description"])
        self.assertEqual(neuron["pos_str"], PIRATE["pos_str"])

    def test_search_model(self):
        r = self.post("/api/explanation/search-model", {"modelId": LLAMA, "query": "dogs and puppies"})
        self.assertEqual(r.status, 200, r.data)
        self.assertEqual(r.json()["results"][0]["index"], "3157")
        r = self.post("/api/explanation/search-model", {"modelId": "nope", "query": "dogs"})
        self.assertEqual((r.status, r.json()["results"]), (200, []))

    def test_query_of_2_chars(self):
        self.assert_400(self.search(query="ab"), "query must be at least 3 characters")

    def test_unknown_model_or_source_set_is_500_unknown_error(self):
        for over in ({"modelId": "gpt-5"}, {"layers": ["50-res-jb"]}, {"layers": []}):
            r = self.search(**over)
            self.assertEqual(r.status, 500, over)
            self.assertEqual(r.json(), {"message": "Unknown Error"})

    def test_null_body(self):
        r = self.post("/api/explanation/search", raw=b"null")
        self.assertEqual((r.status, r.json()), (400, {"message": "Invalid JSON body"}))


class Features(DoubleTest):
    def test_get_feature(self):
        r = self.call("GET", f"/api/feature/{LLAMA}/{LLAMA_SRC}/2810")
        self.assertEqual(r.status, 200, r.data)
        n = r.json()
        self.assertEqual((n["modelId"], n["layer"], n["index"]), (LLAMA, LLAMA_SRC, "2810"))
        for key in ("maxActApprox", "frac_nonzero", "pos_str", "pos_values", "neg_str", "neg_values", "hookName",
                    "vector", "activations", "explanations", "freq_hist_data_bar_heights",
                    "freq_hist_data_bar_values"):
            self.assertIn(key, n)
        self.assertEqual(n["vector"], [])
        self.assertEqual(len(n["pos_str"]), 8)
        self.assertNotIn("trigger_words", n)
        self.assertNotIn("steered_phrases", n)
        maxes = [a["maxValue"] for a in n["activations"]]
        self.assertEqual(maxes, sorted(maxes, reverse=True))
        act = n["activations"][0]
        self.assertEqual(act["values"][act["maxValueTokenIndex"]], act["maxValue"])
        self.assertEqual(act["minValue"], min(act["values"]))
        self.assertEqual(len(act["tokens"]), len(act["values"]))
        self.assertEqual(set(n["explanations"][0]),
                         {"id", "description", "explanationModelName", "typeName", "scores", "triggeredByUser"})

    def test_unknown_feature_is_404_error(self):
        for index in ("65536", "02810"):
            r = self.call("GET", f"/api/feature/{LLAMA}/{LLAMA_SRC}/{index}")
            self.assertEqual((r.status, r.json()), (404, {"error": cd.ERROR_NOT_FOUND_MESSAGE}))
        # Every latent in range exists, as on the real service: one without a fixture is a filler.
        r = self.call("GET", f"/api/feature/{LLAMA}/{LLAMA_SRC}/0")
        self.assertEqual(r.status, 200)
        self.assertIn("filler", r.json()["explanations"][0]["description"])
        r = self.call("GET", f"/api/feature/gpt-5/{LLAMA_SRC}/2810")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json()["error"], cd.ERROR_NOT_FOUND_MESSAGE)

    def test_batch(self):
        r = self.post("/api/features", [
            {"modelId": LLAMA, "layer": LLAMA_SRC, "index": 33333, "maxActsToReturn": 2},
            {"modelId": LLAMA, "layer": LLAMA_SRC, "index": 2810},
            {"modelId": LLAMA, "layer": LLAMA_SRC, "index": 70000},
        ])
        self.assertEqual(r.status, 200, r.data)
        body = r.json()
        self.assertEqual([n["index"] for n in body], ["33333", "2810"], "a latent past the source's width is left out")
        self.assertTrue(all(len(n["activations"]) == 2 for n in body))
        self.assert_400(self.post("/api/features", [{"modelId": LLAMA, "layer": LLAMA_SRC}]),
                        "[0].index is a required field")

    def test_unknown_api_route_is_404(self):
        r = self.call("GET", "/api/nothing-here")
        self.assertEqual(r.status, 404)
        self.assertIn("error", r.json())


class Activations(DoubleTest):
    def act(self, text, **feat):
        f = {"modelId": LLAMA, "source": LLAMA_SRC, "index": "2810"}
        f.update(feat)
        return self.post("/api/activation/new", {"feature": f, "customText": text})

    def test_single(self):
        r = self.act("Arr matey, where is the treasure?")
        self.assertEqual(r.status, 200, r.data)
        a = r.json()
        self.assertEqual(a["tokens"][:3], ["<|begin_of_text|>", "Arr", " matey"])
        self.assertEqual(a["values"][0], 0)
        self.assertGreater(a["values"][2], 0)
        self.assertEqual(a["maxValue"], max(a["values"]))
        self.assertEqual(a["values"][a["maxValueTokenIndex"]], a["maxValue"])
        self.assertEqual((a["modelId"], a["layer"], a["index"]), (LLAMA, LLAMA_SRC, "2810"))
        for key in ("minValue", "dataSource", "createdAt"):
            self.assertIn(key, a)
        quiet = self.act("The committee approved the budget.").json()
        self.assertEqual(quiet["maxValue"], 0)

    def test_ignore_bos(self):
        r = self.post("/api/activation/new", {"feature": {"modelId": LLAMA, "source": LLAMA_SRC, "index": 2810},
                                              "customText": "Ahoy", "ignoreBos": True})
        self.assertEqual(r.json()["tokens"], ["Ahoy"])

    def test_batch(self):
        r = self.act(["Ahoy!", "No pirates here."])
        self.assertEqual(r.status, 200, r.data)
        self.assertEqual(len(r.json()), 2)

    def test_batch_of_5_is_rejected(self):
        r = self.act(["a", "b", "c", "d", "e"])
        self.assertEqual(r.status, 500)  # inference's 400 escapes the route (see the report)
        self.assertEqual(r.json(), {"error": cd.SERVER_FAULT_MESSAGE, "message": cd.SERVER_FAULT_MESSAGE})

    def test_missing_field_and_no_access_are_500(self):
        r = self.post("/api/activation/new", {"customText": "hi"})
        self.assertEqual(r.status, 500)
        r = self.act("hi", modelId="gpt-5")
        self.assertEqual((r.status, r.json()), (500, {"message": cd.ERROR_NOT_FOUND_MESSAGE}))


class TopkByToken(DoubleTest):
    def topk(self, **over):
        body = {"modelId": LLAMA, "source": LLAMA_SRC, "text": "Arr matey, bonjour mon ami!"}
        body.update(over)
        return self.post("/api/search-topk-by-token", body)

    def test_single_and_density_filter(self):
        r = self.topk()
        self.assertEqual(r.status, 200, r.data)
        body = r.json()
        self.assertEqual(body["source"], LLAMA_SRC)
        self.assertEqual(body["results"][0]["position"], 1)  # BOS dropped (ignoreBos default true)
        by_token = {row["token"]: row for row in body["results"]}
        top = by_token[" matey"]["topFeatures"][0]
        self.assertEqual(list(top), ["activationValue", "featureIndex", "feature"])
        self.assertEqual(top["featureIndex"], 2810)
        self.assertNotIn("activations", top["feature"])
        self.assertEqual(top["feature"]["explanations"][0]["description"], PIRATE["description"])
        # French (frac_nonzero 0.0184) is over the default 0.01 threshold; 0 disables the filter
        self.assertEqual(by_token[" bonjour"]["topFeatures"], [])
        unfiltered = {row["token"]: row for row in self.topk(densityThreshold=0).json()["results"]}
        self.assertEqual(unfiltered[" bonjour"]["topFeatures"][0]["featureIndex"], 7123)

    def test_batch_has_no_feature(self):
        r = self.topk(text=["Arr matey", "bonjour"])
        self.assertEqual(r.status, 200, r.data)
        body = r.json()
        self.assertEqual(list(body), ["results"])
        self.assertEqual(len(body["results"]), 2)
        tf = body["results"][0]["results"][1]["topFeatures"][0]
        self.assertEqual(set(tf), {"activationValue", "featureIndex"})

    def test_num_results_21(self):
        self.assert_400(self.topk(numResults=21), "numResults must be less than or equal to 20")

    def test_model_id_over_50_chars(self):
        self.assert_400(self.topk(modelId="m" * 51), "modelId must be at most 50 characters")

    def test_unknown_source_is_500(self):
        r = self.topk(source="51-resid-post-gf")
        self.assertEqual((r.status, r.json()), (500, {"message": cd.ERROR_NOT_FOUND_MESSAGE}))


class ControlAndCli(DoubleTest):
    def test_log_records_requests_and_api_key(self):
        self.steer(features=[])
        self.call("GET", f"/api/feature/{LLAMA}/{LLAMA_SRC}/2810", headers={"x-api-key": "sk-np-test"})
        log = self.call("GET", "/__contract/log").json()
        self.assertEqual([e["method"] for e in log], ["POST", "GET"])
        self.assertEqual(log[0]["path"], "/api/steer-chat")
        self.assertEqual(log[0]["body"]["modelId"], LLAMA)
        self.assertIsNone(log[0]["x_api_key"])
        self.assertEqual(log[1]["x_api_key"], "sk-np-test")
        self.post("/__contract/reset", {})
        self.assertEqual(self.call("GET", "/__contract/log").json(), [])

    def test_command_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            port_file = os.path.join(tmp, "port")
            proc = subprocess.Popen(
                [sys.executable, cd.__file__, "--port", "0", "--port-file", port_file, "--steer-limit", "3"],
                stdout=subprocess.PIPE, text=True)
            try:
                line = proc.stdout.readline().strip()
                self.assertRegex(line, r"^contract double listening on http://127\.0\.0\.1:\d+$")
                port = int(line.rsplit(":", 1)[1])
                deadline = time.time() + 5
                while not os.path.exists(port_file) and time.time() < deadline:
                    time.sleep(0.01)
                with open(port_file) as fh:
                    self.assertEqual(int(fh.read()), port)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/__contract/limits")
                self.assertEqual(json.loads(conn.getresponse().read()), {"steer": 3, "search": 200})
                conn.close()
            finally:
                proc.terminate()
                proc.wait(timeout=5)
                proc.stdout.close()


if __name__ == "__main__":
    unittest.main()
