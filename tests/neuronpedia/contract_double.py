#!/usr/bin/env python3
"""Neuronpedia contract double: a contract double of Neuronpedia's API, never the real service.

A test double of www.neuronpedia.org/api/... for Kindling's tests: the headless-Chromium
e2e tests of the page (which calls Neuronpedia straight from the browser) and the tests of
the Rust server that proxies to Neuronpedia. Python 3 standard library only.

It validates requests the way Neuronpedia does (yup schemas, length and token limits, CORS,
rate limits, the 400/404/429/500 bodies) and answers with fixed, deterministic fixtures.
The contract is /work/shared/reference/neuronpedia-api.md ("the reference", §N below), read
from hijohnnylin/neuronpedia @ ebb8426fc550ad5d1f76d52c271a624af3c08a57. Where the reference
is silent, the behaviour was read from that same commit's source (file named in a comment);
where even that says nothing, the comment says "guess".

Usage:
    python3 tests/neuronpedia/contract_double.py [--host 127.0.0.1] [--port 0]
        [--port-file PATH] [--steer-limit N] [--search-limit N] [--verbose]

Control endpoints (not part of Neuronpedia, outside /api, never rate limited):
    POST /__contract/reset    clear rate-limit windows, the request log and saved steer outputs
    GET  /__contract/log      JSON list of {method, path, body, x_api_key} received under /
    GET  /__contract/limits   current {"steer": N, "search": N}
    POST /__contract/limits   {"steer": N, "search": N} (either key optional) sets them
    POST /__contract/stream   {"split": true}: steer-chat streams DEFAULT's first snapshots
                              alone (STEERED null), as with two inference hosts; reset clears it
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# =====================================================================================
# LIMITS: every limit the double enforces, in one place.
# unconfirmed live: the reference reads the source at one commit; that the live deployment runs
# that commit is itself unconfirmed (reference header).
# =====================================================================================
LIMITS = {
    # §0 rate limits (middleware.ts NORMAL_RATE_LIMITS): sliding '60 m' window keyed by client
    # IP. The list order is the middleware's: EVERY entry whose prefix the (lower-cased) path
    # startsWith is charged, in this order, until one refuses; the refusing entry is the one the
    # 429 names. x-limit-remaining is the remaining count of the last entry charged (so the most
    # specific one). The higher tier (HIGHER_LIMIT_API_TOKENS keys) is not modelled.
    "rate_window_s": 3600,  # §0 '60 m'
    "rate_limits": [
        ("/", 25000),  # §0 "/api and / 25000 each"
        ("/api", 25000),  # §0
        ("/api/activation/new", 1000),  # §0
        ("/api/explanation/search", 200),  # §0 (also covers search-model, search-all, ...)
        ("/api/steer", 240),  # §0 (also covers /api/steer-chat)
        ("/api/search-topk-by-token", 500),  # §0
        ("/api/search-all", 1600),  # §0
    ],
    # §1 steer-chat (app/api/steer-chat/route.tsx, lib/utils/steer.ts)
    "nnsight_models": ("llama3.3-70b-it", "gpt-oss-20b"),  # §1 NNSIGHT_MODELS
    "steer_prompt_chars": 2048,  # §1 sum of content per array
    "steer_prompt_chars_nnsight": 8192,  # §1
    "steer_prompt_chars_assistant_axis": 24576,  # §1 isAssistantAxis
    "steer_n_tokens_min": 1,  # §1
    "steer_n_tokens_max": 256,  # §1 "Otherwise"
    "steer_n_tokens_max_nnsight": 1024,  # unconfirmed live: §1; the older cookbook says "Max 64 completion tokens"
    "steer_n_tokens_max_thinking": 768,  # §1 model.thinking
    "steer_n_tokens_max_assistant_axis": 768,  # §1
    "steer_strength_min": -300,  # §1 (no max)
    "steer_temperature_min": 0,  # §1
    "steer_temperature_max": 2,  # §1
    "steer_seed_abs_max": 100000000,  # §1 ±1e8
    "steer_strength_multiplier_min": 0,  # §1
    "steer_strength_multiplier_max": 10,  # §1
    "steer_freq_penalty_min": -2,  # §1
    "steer_freq_penalty_max": 2,  # §1
    "steer_freq_penalty_default": 1.0,  # §1
    "steer_roles": ("user", "assistant", "system", "model", "developer"),  # §1
    "steer_methods": ("SIMPLE_ADDITIVE", "ORTHOGONAL_DECOMP", "PROJECTION_CAP"),  # §1
    "steer_method_default": "SIMPLE_ADDITIVE",  # §1
    # §1 "Inference token cap": templated prompt tokens over TOKEN_LIMIT -> 400 "Text too long".
    # unconfirmed live: the source default is 200 (apps/inference/.../args.py) and is used for
    # gemma-2-2b; for llama3.3-70b-it no value is documented (8192 prompt chars and the cookbook's
    # 1024-token activations imply far more than 200), so the double does not enforce one (None).
    "steer_prompt_token_limit": {"llama3.3-70b-it": None, "gemma-2-2b": 200},
    # §2 feature search (lib/db/explanation.ts, app/api/explanation/*/route.ts)
    "search_query_min_chars": 3,  # §2
    "search_page_size": 20,  # §2 MAX_EXPLANATION_SEARCH_RESULTS
    "search_acts_per_neuron": 3,  # §2 "3 top activations"
    # §3 activations on custom text (apps/inference/.../endpoints/activation/*.py)
    "activation_batch_max": 4,  # §3 "<= 4 prompts per batch" (MAX_BATCH_SIZE)
    # §3 per-prompt token cap (÷4 in a batch).
    # unconfirmed live: llama from the cookbook (1024 single / 256 per batch prompt); gemma-2-2b
    # from the source default TOKEN_LIMIT 200 (activation_token_limit <= token_limit).
    "activation_token_limit": {"llama3.3-70b-it": 1024, "gemma-2-2b": 200},
    "topk_model_source_max_chars": 50,  # §3 modelId, source <= 50 chars
    "topk_num_results_min": 1,  # §3
    "topk_num_results_max": 20,  # §3
    "topk_num_results_default": 10,  # §3
    "topk_inference_default_top_k": 5,  # topk_by_token.py DEFAULT_TOP_K (numResults: null)
    "topk_density_default": 0.01,  # §3
    "topk_ignore_bos_default": True,  # §3
}

# Strings the real service sends (same commit).
NEXT_PUBLIC_URL = "https://www.neuronpedia.org"  # §1 shareUrl = .../steer/{id}
# lib/db/userCanAccess.ts ERROR_NOT_FOUND_MESSAGE (the reference §0 names it)
ERROR_NOT_FOUND_MESSAGE = (
    "The model, source, or feature you specified is not available. Check available public "
    "models/sources (including which ones have inference enabled) at "
    f"{NEXT_PUBLIC_URL}/available-resources"
)
# lib/api-error.ts SERVER_FAULT_MESSAGE (§0 "Something went wrong on our end…")
SERVER_FAULT_MESSAGE = "Something went wrong on our end. The error has been reported."
# lib/utils/steer.ts ERROR_STEER_MAX_PROMPT_CHARS
ERROR_STEER_MAX_PROMPT_CHARS = (
    "Total conversation length exceeds the maximum number of characters allowed. "
    "Please click Reset to start a new conversation."
)
CONTACT_EMAIL_ADDRESS = "johnny@neuronpedia.org"  # lib/env.ts NEURONPEDIA_EMAIL_ADDRESS
RATE_LIMIT_WINDOW = "60 m"
CONTROL_PREFIX = "/__contract/"

# =====================================================================================
# JavaScript value semantics (what Node/V8 and yup do with JSON values)
# =====================================================================================


class _Undefined:
    __slots__ = ()

    def __repr__(self):
        return "undefined"

    def __bool__(self):
        return False


UNDEF = _Undefined()
NAN = float("nan")


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def js_truthy(v):
    if v is None or v is UNDEF or v is False:
        return False
    if is_num(v):
        return not (v == 0 or (isinstance(v, float) and math.isnan(v)))
    if isinstance(v, str):
        return v != ""
    return True


def js_num_str(x):
    """Number.prototype.toString."""
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        if x == 0:
            return "0"
        if x.is_integer() and abs(x) < 1e21:
            return str(int(x))
        r = repr(x)
        if "e" in r:
            if 1e-7 <= abs(x) < 1e21:
                r = format(Decimal(r), "f")
            else:
                m, e = r.split("e")
                e = int(e)
                r = f"{m}e{'+' if e > 0 else '-'}{abs(e)}"
        return r
    return str(x)


def js_string(v):
    """String(v)."""
    if v is None:
        return "null"
    if v is UNDEF:
        return "undefined"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if is_num(v):
        return js_num_str(v)
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return ",".join("" if x is None or x is UNDEF else js_string(x) for x in v)
    return "[object Object]"


_JS_DEC = re.compile(r"[+-]?(?:Infinity|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\Z")
_JS_RADIX = re.compile(r"0([xXoObB])([0-9a-fA-F]+)\Z")
_JS_PARSE_FLOAT = re.compile(r"[\s\ufeff]*([+-]?(?:Infinity|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))")


def js_unary_plus(s):
    """+s for a string without whitespace."""
    if _JS_DEC.match(s):
        return float(s.replace("Infinity", "inf"))
    m = _JS_RADIX.match(s)
    if m:
        try:
            return float(int(m.group(2), {"x": 16, "o": 8, "b": 2}[m.group(1).lower()]))
        except ValueError:
            return NAN
    return NAN


def js_parse_float(s):
    m = _JS_PARSE_FLOAT.match(s)
    if not m:
        return NAN
    return float(m.group(1).replace("Infinity", "inf"))


def js_strict_eq(a, b):
    if is_num(a) and is_num(b):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, bool) and isinstance(b, bool):
        return a == b
    return a is b


def utf16_len(s):
    """String.prototype.length."""
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def js_print_value(v, quote_strings=True):
    """yup's printValue (util/printValue.ts)."""

    def simple(x):
        if x is None:
            return "null"
        if x is UNDEF:
            return "undefined"
        if x is True:
            return "true"
        if x is False:
            return "false"
        if is_num(x):
            return js_num_str(float(x)) if isinstance(x, float) else str(x)
        if isinstance(x, str):
            return f'"{x}"' if quote_strings else x
        return None

    s = simple(v)
    if s is not None:
        return s

    def conv(x):
        s2 = simple(x)
        if s2 is not None:
            return s2
        if isinstance(x, list):
            return [conv(i) for i in x]
        return {k: conv(i) for k, i in x.items()}

    return json.dumps(conv(v), indent=2, ensure_ascii=False)


class JsonParseError(Exception):
    pass


def parse_js_json(raw):
    """JSON.parse(await request.text()): a SyntaxError with V8's wording (approximate)."""
    text = raw.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]

    def no_constants(name):
        raise JsonParseError(f"Unexpected token '{name[0]}', {_v8_excerpt(text)} is not valid JSON")

    try:
        return json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()):
            raise JsonParseError("Unexpected end of JSON input") from None
        raise JsonParseError(
            f"Unexpected token '{text[e.pos]}', {_v8_excerpt(text)} is not valid JSON"
        ) from None


def _v8_excerpt(text):
    return f'"{text}"' if len(text) <= 30 else f'"{text[:30]}"...'


def to_js(o):
    """What JSON.stringify writes: integral floats as integers, NaN/Infinity as null,
    undefined properties dropped."""
    if isinstance(o, float):
        if math.isnan(o) or math.isinf(o):
            return None
        if o.is_integer() and abs(o) < 2**53:
            return int(o)
        return o
    if isinstance(o, dict):
        return {k: to_js(v) for k, v in o.items() if v is not UNDEF}
    if isinstance(o, (list, tuple)):
        return [None if v is UNDEF else to_js(v) for v in o]
    return o


def dumps(o):
    return json.dumps(to_js(o), ensure_ascii=False, separators=(",", ":"))


# =====================================================================================
# A small yup (v1.x, as ^1.3.2 in apps/webapp/package.json): cast, then validate, abortEarly.
# Order: cast; typeError; oneOf; nullable/required; then tests in declaration order; then
# children. Object fields are visited in REVERSE declaration order (yup's sortFields reverses
# its toposort), so with several errors the one reported is the last-declared failing field.
# =====================================================================================


class YupError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.message = message


def _label(path):
    return path or "this"


class Schema:
    type_name = "mixed"

    def __init__(self):
        self._required = False
        self._default = UNDEF
        self._one_of = None
        self._tests = []

    def required(self):
        self._required = True
        return self

    def default(self, value):
        self._default = value
        return self

    def one_of(self, values):
        self._one_of = list(values)
        return self

    def _cast(self, v):
        return v

    def _check(self, v):
        return True

    def validate(self, raw, path=""):
        v = self._default if raw is UNDEF else self._cast(raw)
        label = _label(path)
        if v is not UNDEF and v is not None and not self._check(v):
            cast_msg = "."
            if raw is not None and raw is not UNDEF and not js_strict_eq(raw, v):
                cast_msg = f" (cast from the value `{js_print_value(raw)}`)."
            raise YupError(
                f"{label} must be a `{self.type_name}` type, but the final value was: "
                f"`{js_print_value(v)}`{cast_msg}"
            )
        if self._one_of is not None and v is not UNDEF and v is not None:
            if not any(js_strict_eq(v, o) for o in self._one_of):
                raise YupError(
                    f"{label} must be one of the following values: "
                    + ", ".join(js_print_value(o, False) for o in self._one_of)
                )
        if self._required and (v is None or v is UNDEF):
            raise YupError(f"{label} is a required field")
        if v is not None and v is not UNDEF:
            for test in self._tests:  # yup's tests are skipAbsent
                msg = test(v, label)
                if msg:
                    raise YupError(msg)
        return self._children(v, path)

    def _children(self, v, path):
        return v


class Mixed(Schema):
    pass


class Str(Schema):
    type_name = "string"

    def _cast(self, v):
        if v is None or isinstance(v, (str, list)):
            return v
        s = js_string(v)
        return v if s == "[object Object]" else s

    def _check(self, v):
        return isinstance(v, str)

    def required(self):
        super().required()  # string().required() also refuses ""
        self._tests.append(lambda v, l: None if len(v) else f"{l} is a required field")
        return self

    def min(self, n):
        self._tests.append(lambda v, l: None if utf16_len(v) >= n else f"{l} must be at least {n} characters")
        return self

    def max(self, n):
        self._tests.append(lambda v, l: None if utf16_len(v) <= n else f"{l} must be at most {n} characters")
        return self


class Num(Schema):
    type_name = "number"

    def _cast(self, v):
        if v is None:
            return v
        parsed = v
        if isinstance(parsed, str):
            parsed = re.sub(r"\s", "", parsed)
            if parsed == "":
                return NAN
            parsed = js_unary_plus(parsed)
        if self._check(parsed):
            return parsed
        return js_parse_float(js_string(parsed))

    def _check(self, v):
        return is_num(v) and not (isinstance(v, float) and math.isnan(v))

    def min(self, n):
        self._tests.append(lambda v, l: None if v >= n else f"{l} must be greater than or equal to {js_num_str(n)}")
        return self

    def max(self, n):
        self._tests.append(lambda v, l: None if v <= n else f"{l} must be less than or equal to {js_num_str(n)}")
        return self

    def integer(self):
        self._tests.append(
            lambda v, l: None if (math.isfinite(v) and float(v).is_integer()) else f"{l} must be an integer"
        )
        return self


class Bool(Schema):
    type_name = "boolean"

    def _cast(self, v):
        if isinstance(v, bool):
            return v
        s = js_string(v)
        if re.fullmatch(r"(?i:true|1)", s):
            return True
        if re.fullmatch(r"(?i:false|0)", s):
            return False
        return v

    def _check(self, v):
        return isinstance(v, bool)


class Arr(Schema):
    type_name = "array"

    def __init__(self, of=None):
        super().__init__()
        self._of = of

    def _check(self, v):
        return isinstance(v, list)

    def _children(self, v, path):
        if not isinstance(v, list) or self._of is None:
            return v
        return [self._of.validate(item, f"{path}[{i}]") for i, item in enumerate(v)]


class Obj(Schema):
    type_name = "object"

    def __init__(self, fields):
        super().__init__()
        self._fields = fields
        self._nodes = list(reversed(list(fields)))

    def _check(self, v):
        return isinstance(v, dict)

    def _children(self, v, path):
        if not isinstance(v, dict):
            return v
        out = {}
        for key in self._nodes:
            sub = f"{path}.{key}" if path else key
            res = self._fields[key].validate(v.get(key, UNDEF), sub)
            if res is not UNDEF:
                out[key] = res
        for key, val in v.items():  # yup keeps unknown keys (no stripUnknown)
            if key not in self._fields:
                out[key] = val
        return out


def _chat_message_schema():
    return Obj({"content": Str().required(), "role": Str().one_of(LIMITS["steer_roles"]).required()})


# app/api/steer-chat/route.tsx steerSchema (§1)
STEER_CHAT_SCHEMA = Obj(
    {
        "defaultChatMessages": Arr(_chat_message_schema()).required(),
        "steeredChatMessages": Arr(_chat_message_schema()).required(),
        "modelId": Str().required(),
        "features": Arr(
            Obj(
                {
                    "modelId": Str().required(),
                    "layer": Str().required(),
                    "index": Num().integer().required(),
                    "strength": Num().required().min(LIMITS["steer_strength_min"]),
                }
            ).required()
        ).required(),
        "temperature": Num().min(LIMITS["steer_temperature_min"]).max(LIMITS["steer_temperature_max"]).required(),
        "n_tokens": Num().integer().min(LIMITS["steer_n_tokens_min"]).required(),
        "freq_penalty": Num()
        .min(LIMITS["steer_freq_penalty_min"])
        .max(LIMITS["steer_freq_penalty_max"])
        .default(LIMITS["steer_freq_penalty_default"]),
        "seed": Num().min(-LIMITS["steer_seed_abs_max"]).max(LIMITS["steer_seed_abs_max"]).required(),
        "strength_multiplier": Num()
        .min(LIMITS["steer_strength_multiplier_min"])
        .max(LIMITS["steer_strength_multiplier_max"])
        .required(),
        "steer_special_tokens": Bool().required(),
        "stream": Bool().default(False),
        "steer_method": Str().one_of(LIMITS["steer_methods"]).default(LIMITS["steer_method_default"]),
        "isAssistantAxis": Bool().default(False),
    }
)

# app/api/explanation/search/route.tsx (§2)
EXPLANATION_SEARCH_SCHEMA = Obj(
    {
        "modelId": Str().required(),
        "layers": Arr(Str().required()).required(),
        "query": Str().required().min(LIMITS["search_query_min_chars"]),
        "offset": Num().integer(),
    }
)
# app/api/explanation/search-model/route.tsx (§2)
EXPLANATION_SEARCH_MODEL_SCHEMA = Obj(
    {
        "modelId": Str().required(),
        "query": Str().required().min(LIMITS["search_query_min_chars"]),
        "offset": Num().integer(),
    }
)
# app/api/features/route.ts (§2)
FEATURES_SCHEMA = Arr(
    Obj(
        {
            "modelId": Str().required(),
            "layer": Str().required(),
            "index": Num().integer().required(),
            "maxActsToReturn": Num().integer(),
        }
    ).required()
)
# app/api/search-topk-by-token/route.tsx (§3)
TOPK_SCHEMA = Obj(
    {
        "modelId": Str().required().max(LIMITS["topk_model_source_max_chars"]),
        "source": Str().required().max(LIMITS["topk_model_source_max_chars"]),
        "text": Mixed().required(),
        "numResults": Num()
        .min(LIMITS["topk_num_results_min"])
        .max(LIMITS["topk_num_results_max"])
        .default(LIMITS["topk_num_results_default"]),
        "ignoreBos": Bool().default(LIMITS["topk_ignore_bos_default"]),
        "densityThreshold": Num().default(LIMITS["topk_density_default"]),
    }
)

# =====================================================================================
# Models, sources and fixtures
# =====================================================================================
LLAMA = "llama3.3-70b-it"
LLAMA_SOURCE = "50-resid-post-gf"
GEMMA = "gemma-2-2b"
GEMMA_SOURCE = "20-gemmascope-res-16k"
FIXTURE_CREATED_AT = "2025-11-22T00:00:00.000Z"
# cuid-shaped id of the (public) user the fixture activations belong to; made up.
PUBLIC_ACTIVATIONS_USER_ID = "cm0contractdoublepublic01"

MODELS = {
    LLAMA: {
        "row": {
            "id": LLAMA,
            "displayNameShort": "Llama3.3-70B-IT",
            "displayName": "Llama 3.3 70B Instruct",
            "creatorId": PUBLIC_ACTIVATIONS_USER_ID,
            "tlensId": "meta-llama/Llama-3.3-70B-Instruct",
            "openRouterId": None,
            "dimension": 8192,
            "thinking": False,  # unconfirmed live: §1 "llama3.3-70b-it's thinking flag"; Prisma's default (false)
            "visibility": "PUBLIC",
            "defaultSourceSetName": "resid-post-gf",
            "defaultSourceId": LLAMA_SOURCE,
            "defaultGraphSourceSetName": None,
            "inferenceEnabled": True,
            "instruct": True,
            "layers": 80,
            "neuronsPerLayer": 28672,
            "createdAt": FIXTURE_CREATED_AT,
            "owner": "Meta",
            "updatedAt": FIXTURE_CREATED_AT,
            "website": "https://huggingface.co/meta-llama/Llama-3.3-70B-Instruct",
        },
        "bos": "<|begin_of_text|>",
        "source_sets": {
            "resid-post-gf": {
                "row": {
                    "modelId": LLAMA,
                    "name": "resid-post-gf",
                    "hasDashboards": True,
                    "allowInferenceSearch": True,
                    "visibility": "PUBLIC",
                    "description": "Goodfire SAE, residual stream post",
                    "type": "sae",
                    "creatorName": "Goodfire",
                    "creatorEmail": None,
                    "creatorId": PUBLIC_ACTIVATIONS_USER_ID,
                    "releaseName": "llama3.3-70b-it-gf",  # §5 release page /llama3.3-70b-it-gf
                    "hasGraphs": False,
                    "graphEnabled": False,
                    "similarityMatrixEnabled": False,
                    "defaultOfModelId": LLAMA,
                    "defaultGraphModelId": None,
                    "defaultRange": 1,
                    "defaultShowBreaks": True,
                    "showDfa": False,
                    "showCorrelated": False,
                    "showHeadAttribution": False,
                    "showUmap": False,
                    "createdAt": FIXTURE_CREATED_AT,
                },
                "sources": {LLAMA_SOURCE: 65536},  # §5 65,536 latents
            }
        },
    },
    GEMMA: {
        "row": {
            "id": GEMMA,
            "displayNameShort": "Gemma 2 2B",
            "displayName": "Gemma 2 2B",
            "creatorId": PUBLIC_ACTIVATIONS_USER_ID,
            "tlensId": "gemma-2-2b",
            "openRouterId": None,
            "dimension": 2304,
            "thinking": False,
            "visibility": "PUBLIC",
            "defaultSourceSetName": "gemmascope-res-16k",
            "defaultSourceId": GEMMA_SOURCE,
            "defaultGraphSourceSetName": None,
            "inferenceEnabled": True,
            "instruct": False,
            "layers": 26,
            "neuronsPerLayer": 9216,
            "createdAt": FIXTURE_CREATED_AT,
            "owner": "Google",
            "updatedAt": FIXTURE_CREATED_AT,
            "website": "https://huggingface.co/google/gemma-2-2b",
        },
        "bos": "<bos>",
        "source_sets": {
            "gemmascope-res-16k": {
                "row": {
                    "modelId": GEMMA,
                    "name": "gemmascope-res-16k",
                    "hasDashboards": True,
                    "allowInferenceSearch": True,
                    "visibility": "PUBLIC",
                    "description": "Gemma Scope residual stream SAEs, 16k width",
                    "type": "sae",
                    "creatorName": "Google DeepMind",
                    "creatorEmail": None,
                    "creatorId": PUBLIC_ACTIVATIONS_USER_ID,
                    "releaseName": "gemma-scope-2b-pt-res",
                    "hasGraphs": False,
                    "graphEnabled": False,
                    "similarityMatrixEnabled": False,
                    "defaultOfModelId": GEMMA,
                    "defaultGraphModelId": None,
                    "defaultRange": 1,
                    "defaultShowBreaks": True,
                    "showDfa": False,
                    "showCorrelated": False,
                    "showHeadAttribution": False,
                    "showUmap": False,
                    "createdAt": FIXTURE_CREATED_AT,
                },
                "sources": {GEMMA_SOURCE: 16384},
            }
        },
    },
}

EXPLANATION_MODEL_NAME = "gemini-2.5-flash-lite"  # unconfirmed live: §5 third-party label snapshot
EXPLANATION_TYPE_NAME = "np_acts-logits-general"  # unconfirmed live: §5 third-party label snapshot

# (index, description, maxActApprox, frac_nonzero, trigger_words, steered_phrases,
#  pos_str, neg_str, activation example texts). trigger_words[0] is the degenerate token.
_LLAMA_SPECS = [
    (2810, "pirate speech and nautical slang such as 'arr' and 'matey'", 14.2, 0.00031,
     ["arr", "matey", "ahoy", "pirate", "pirates", "ye", "plank", "treasure", "captain", "landlubbers"],
     ["Arr, matey!", "ye scallywag", "hoist the sails", "shiver me timbers", "walk the plank", "yo ho ho"],
     [" matey", " Arr", " ahoy", " scallywag", " plank", " buccaneer", " landlubber", " hearties"],
     [" spreadsheet", " quarterly", " compliance", " stakeholders", " synergy", " invoice", " onboarding", " KPI"],
     ["Arr, matey! The captain says we sail at dawn.",
      "Ahoy there, ye landlubbers, the treasure be buried on the island.",
      "The pirates made him walk the plank at noon.",
      "Talk like a pirate day is on September nineteenth."]),
    (3157, "references to dogs and puppies", 8.9, 0.00118,
     ["dog", "dogs", "puppy", "puppies", "barked", "bark", "leash", "fetch", "woof", "pup"],
     ["a wagging tail", "the puppies", "a good dog", "woof woof", "fetch the ball", "a loyal pup"],
     [" puppy", " leash", " bark", " canine", " retriever", " paws", " kennel", " fetch"],
     [" cat", " kitten", " feline", " meow", " tabby", " litter", " whiskers", " purr"],
     ["The puppy barked at the mailman all morning.",
      "We took the dogs to the park to play fetch.",
      "Her golden retriever pup pulled hard on the leash.",
      "Woof! said the little dog."]),
    (7123, "the French language and French words", 22.7, 0.0184,
     ["bonjour", "merci", "oui", "le", "la", "les", "très", "mon", "un", "et", "est", "dans",
      "beaucoup", "café", "croissant", "french"],
     ["Bonjour!", "mon ami", "merci beaucoup", "très bien", "c'est la vie", "voilà"],
     [" le", " les", " très", " est", " pour", " avec", " une", " nous"],
     [" the", " which", " however", " although", " whilst", " shall", " ought", " thereby"],
     ["Merci beaucoup, the waiter said in French.",
      "Le chat est sur la table, oui?",
      "She ordered un croissant et un café au lait.",
      "Les enfants jouent dans le jardin."]),
    (10999, "references to food, cooking and meals", 9.8, 0.0062,
     ["food", "cook", "cooked", "cooking", "meal", "meals", "dinner", "breakfast", "recipe", "eat",
      "pasta", "bread", "soup", "delicious"],
     ["a warm bowl of soup", "freshly baked bread", "a hearty breakfast", "simmer the sauce",
      "dinner is served", "a pinch of salt"],
     [" recipe", " delicious", " simmer", " sauté", " flavors", " seasoning", " baking", " dinner"],
     [" theorem", " voltage", " legislation", " firmware", " asteroid", " tariff", " syntax", " enzyme"],
     ["We cooked a big pasta dinner for the whole family.",
      "This recipe for banana bread is easy and delicious.",
      "Breakfast is the most important meal of the day.",
      "She likes to cook soup on cold evenings."]),
    (14492, "formal, polite phrasing in letters", 5.2, 0.0073,
     ["dear", "sincerely", "regards", "respectfully", "kindly", "madam", "sir", "yours", "esteemed"],
     ["Dear Sir or Madam", "Yours sincerely", "I remain respectfully yours", "kindly advise",
      "with warm regards", "at your earliest convenience"],
     [" Sincerely", " Regards", " Dear", " Madam", " respectfully", " kindly", " esteemed", " Yours"],
     [" lol", " hey", " yo", " gonna", " wanna", " dude", " bro", " omg"],
     ["Dear Sir or Madam, I am writing to inquire about the position.",
      "Yours sincerely, Margaret Thompson",
      "Kindly find attached the requested documents. Best regards,",
      "I remain, respectfully yours, the undersigned."]),
    (21011, "expressions of sadness and grief", 6.4, 0.0021,
     ["sad", "sadness", "grief", "mourning", "tears", "sorrow", "loss", "lonely", "cried", "cry"],
     ["a heavy heart", "tears I cannot hold back", "the ache of loss", "a quiet sorrow",
      "grief lingers", "so very lonely"],
     [" grief", " sorrow", " mourning", " heartbreak", " tears", " sadness", " despair", " loneliness"],
     [" hooray", " thrilled", " celebrate", " awesome", " delighted", " party", " excited", " yay"],
     ["After the funeral she cried for hours, overwhelmed by grief.",
      "He felt lonely and sad since his old friend moved away.",
      "Tears of sorrow rolled down her cheeks.",
      "We are still mourning the loss of our grandmother."]),
    (27680, "weather: rain, storms and wind", 11.3, 0.0029,
     ["rain", "storm", "stormy", "wind", "thunder", "lightning", "weather", "cloudy", "drizzle", "forecast"],
     ["the rain falls", "a howling wind", "storm clouds gather", "thunder rumbles",
      "drizzle and gusts", "a stormy night"],
     [" rain", " storms", " gusts", " showers", " forecast", " thunder", " humid", " drizzle"],
     [" algorithm", " verse", " mortgage", " protein", " syntax", " poem", " tax", " chess"],
     ["The forecast calls for heavy rain and strong wind tonight.",
      "Thunder and lightning kept us awake during the storm.",
      "It was a cloudy day with a light drizzle.",
      "Stormy weather delayed the flight."]),
    (33333, "outer space, planets and astronauts", 17.9, 0.0009,
     ["space", "planet", "planets", "astronaut", "astronauts", "orbit", "mars", "moon", "rocket",
      "galaxy", "stars", "nasa"],
     ["among the distant stars", "orbiting Mars", "astronauts aboard the station",
      "the silent void of space", "a rocket launch", "across the galaxy"],
     [" orbit", " astronauts", " spacecraft", " lunar", " galaxies", " NASA", " cosmos", " planetary"],
     [" recipe", " spreadsheet", " lawsuit", " mortgage", " garden", " knitting", " invoice", " shampoo"],
     ["The astronauts aboard the station orbit Earth every ninety minutes.",
      "NASA plans to send a rocket to Mars next decade.",
      "Our galaxy contains billions of stars and planets.",
      "The moon landing inspired a generation."]),
    (38051, "computer programming and code", 19.4, 0.0096,
     ["code", "function", "python", "rust", "compiler", "compile", "variable", "bug", "debug",
      "program", "programming", "loop", "def"],
     ["def main():", "fn main()", "compile the code", "a for loop", "return the value",
      "debug the function"],
     [" function", " variable", " compile", " return", " loop", " syntax", " debug", " API"],
     [" poetry", " meadow", " grandmother", " sunset", " lullaby", " romance", " garden", " picnic"],
     ["The function returns None if the variable is not set.",
      "I wrote a Python program to debug the loop.",
      "The Rust compiler catches the bug before you run the code.",
      "def main(): print('hello')"]),
    (40404, "numbered list markers at the start of a line", 31.5, 0.0412,
     ["1", "2", "3", "4", "5", "6"],
     ["1.", "2.", "3.", "Step 1:", "First,", "Second,"],
     [".", ")", ":", " Step", " First", " Item", " -", " Note"],
     [" however", " meanwhile", " indeed", " moreover", " thus", " hence", " yet", " still"],
     ["Steps:\n1. Preheat the oven.\n2. Mix the flour.\n3. Bake until golden.",
      "Agenda:\n1. Welcome\n2. Budget review\n3. Questions",
      "Top reasons:\n1. Price\n2. Quality"]),
    (45210, "music and songs", 7.7, 0.0035,
     ["music", "song", "songs", "melody", "guitar", "piano", "sing", "sang", "chorus", "rhythm", "band"],
     ["la la la", "a catchy melody", "strum the guitar", "the chorus swells", "sing along",
      "a gentle rhythm"],
     [" melody", " song", " chorus", " guitar", " lyrics", " rhythm", " piano", " tune"],
     [" silence", " spreadsheet", " asphalt", " invoice", " tax", " statute", " gravel", " ledger"],
     ["She played a gentle melody on the piano.",
      "The band sang their new song at the concert.",
      "Learning guitar takes patience and rhythm.",
      "Everyone joined in on the chorus."]),
    (51515, "questions directed at the reader", 4.3, 0.0157,
     ["you", "your", "ever", "wondered", "wonder", "imagine", "?"],
     ["Have you ever wondered why?", "What do you think?", "Can you imagine?", "Do you see it now?",
      "Isn't it curious?", "What would you do?"],
     ["?", " you", " yourself", " wondered", " imagine", " ever", " guess", " think"],
     [".", " I", " we", " he", " she", " they", " it", " one"],
     ["Have you ever wondered why the sky is blue?",
      "What would you do if you won the lottery?",
      "Can you imagine a world without music?",
      "Do you remember your first day at school?"]),
    (52977, "money and prices", 10.1, 0.0051,
     ["money", "price", "cost", "costs", "dollars", "$", "cheap", "expensive", "paid", "pay", "budget", "cents"],
     ["$19.99", "a bargain price", "dollars and cents", "on a tight budget", "worth every penny",
      "pay in full"],
     [" dollars", " price", " cost", " $", " budget", " cheaper", " paid", " cents"],
     [" love", " dream", " forest", " poem", " wisdom", " courage", " soul", " breeze"],
     ["The price went up to $20, which is too expensive.",
      "We need to save money and stick to a budget.",
      "It costs five dollars and fifty cents.",
      "She paid for the tickets with cash."]),
    (57344, "the word 'not' and other negations", 36.8, 0.0325,
     ["not", "no", "never", "nothing", "none", "neither", "nor", "'t", "cannot"],
     ["not", "never", "no, not at all", "nothing", "neither this nor that", "not ever"],
     [" not", " never", " no", " nothing", "n't", " neither", " none", " nor"],
     [" definitely", " always", " yes", " certainly", " absolutely", " indeed", " surely", " exactly"],
     ["I do not think that is true.",
      "She never said no to a challenge.",
      "There is nothing we can do, and none of us can't help.",
      "Neither the manager nor the staff knew."]),
    (60001, "Shakespearean and archaic English (thou, thy, hath)", 12.6, 0.00044,
     ["thou", "thy", "thee", "hath", "doth", "art", "wherefore", "thine", "ere", "forsooth", "hast"],
     ["thou art", "wherefore dost thou", "it hath been said", "forsooth", "thy gentle heart",
      "ere the morrow"],
     [" thou", " thy", " thee", " hath", " doth", " thine", " art", " ere"],
     [" gonna", " lol", " okay", " awesome", " dude", " smartphone", " email", " website"],
     ["Wherefore art thou Romeo?",
      "Thou hast a heart of gold, and thy words are kind.",
      "He hath spoken, and doth not jest.",
      "Shall I compare thee to a summer day?"]),
    (63999, "anger and frustration", 3.1, 0.00012,
     ["angry", "anger", "furious", "rage", "frustrated", "frustrating", "annoyed", "mad", "livid"],
     ["I am furious", "this is so frustrating", "boiling with rage", "enough is enough",
      "absolutely livid", "grr"],
     [" furious", " rage", " angry", " frustrated", " livid", " annoyed", " outraged", " irritated"],
     [" calm", " serene", " peaceful", " grateful", " relaxed", " content", " gentle", " soothing"],
     ["I am so angry and frustrated right now!",
      "He slammed the door in a fit of rage.",
      "This slow internet is so frustrating.",
      "She was furious about the delay."]),
]

_GEMMA_SPECS = [
    (1208, "mentions of cats and kittens", 38.4, 0.0011,
     ["cat", "cats", "kitten", "kittens", "meow", "purring", "feline"],
     ["meow", "a purring kitten", "the cat sat on the mat", "soft paws", "whiskers twitching",
      "a curious cat"],
     [" cat", " kitten", " feline", " meow", " purr", " whiskers", " paws", " tabby"],
     [" dog", " puppy", " leash", " bark", " kennel", " canine", " hound", " fetch"],
     ["The cat curled up on the windowsill.",
      "Two kittens were purring on the sofa.",
      "Meow, said the hungry cat."]),
    (6021, "the Golden Gate Bridge and San Francisco", 24.1, 0.00087,
     ["golden", "gate", "bridge", "san", "francisco"],
     ["the Golden Gate Bridge", "fog over the bay", "San Francisco", "the orange towers",
      "a cable car", "across the bridge"],
     [" Bridge", " Gate", " Francisco", " bay", " fog", " Marin", " cable", " towers"],
     [" desert", " Sahara", " cactus", " tundra", " prairie", " Alps", " savanna", " steppe"],
     ["We walked across the Golden Gate Bridge at sunset.",
      "San Francisco is famous for its fog.",
      "The bridge connects the city to Marin."]),
    (12044, "expressions of happiness and joy", 15.6, 0.0147,
     ["happy", "joy", "delighted", "glad", "cheerful", "smile", "smiled", "joyful"],
     ["what a joyful day", "a big smile", "so happy", "pure delight", "my heart sings",
      "cheerful and bright"],
     [" happy", " joy", " delighted", " glad", " cheerful", " smile", " thrilled", " wonderful"],
     [" sad", " gloomy", " miserable", " grief", " angry", " bitter", " upset", " dreadful"],
     ["She smiled, delighted by the news.",
      "We were so happy to see you!",
      "Their joyful laughter filled the room."]),
    (15990, "coffee and tea", 9.3, 0.0013,
     ["coffee", "tea", "espresso", "latte", "cup", "brew", "caffeine"],
     ["a fresh cup of coffee", "a pot of tea", "a double espresso", "the morning brew",
      "a warm latte", "steeped for three minutes"],
     [" coffee", " tea", " espresso", " latte", " brew", " mug", " caffeine", " barista"],
     [" beer", " vodka", " soda", " lemonade", " milkshake", " wine", " juice", " cocktail"],
     ["I need a cup of coffee before work.",
      "She brewed a pot of green tea.",
      "One latte and a double espresso, please."]),
]

# =====================================================================================
# Tokenizer (Llama-3 style pre-tokenization; not BPE: words stay whole unless very long)
# =====================================================================================
_SPECIAL_TOKEN_RE = {
    LLAMA: re.compile(r"<\|[A-Za-z0-9_]+\|>"),
    GEMMA: re.compile(r"<(?:bos|eos|pad|start_of_turn|end_of_turn)>"),
}
_PRETOKENIZE_RE = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+|.",
    re.DOTALL,
)
_LONG_WORD = 12  # words longer than this are split in 6-letter pieces, roughly like BPE


def _pretokenize(text):
    out = []
    for tok in _PRETOKENIZE_RE.findall(text):
        core = tok.lstrip()
        if len(core) > _LONG_WORD and core.isalpha():
            lead = tok[: len(tok) - len(core)]
            pieces = [core[i: i + 6] for i in range(0, len(core), 6)]
            out.append(lead + pieces[0])
            out.extend(pieces[1:])
        else:
            out.append(tok)
    return out


def tokenize(model_id, text):
    """-> [(token, is_special)], special tokens in the text kept whole."""
    special = _SPECIAL_TOKEN_RE[model_id]
    out, pos = [], 0
    for m in special.finditer(text):
        out.extend((t, False) for t in _pretokenize(text[pos: m.start()]))
        out.append((m.group(0), True))
        pos = m.end()
    out.extend((t, False) for t in _pretokenize(text[pos:]))
    return out


def tokenize_with_bos(model_id, text):
    """The inference server prepends BOS unless the prompt already starts with it."""
    bos = MODELS[model_id]["bos"]
    if not text.startswith(bos):
        text = bos + text
    return tokenize(model_id, text)


def _norm(token):
    return token.strip().lower()


def _h(*parts):
    digest = hashlib.md5(":".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF


def _cuid(seed=None):
    """A Prisma cuid()-shaped id: 'c' + 24 base-36 characters."""
    n = int(hashlib.md5(seed.encode()).hexdigest(), 16) if seed is not None else uuid.uuid4().int
    chars = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(24):
        n, r = divmod(n, 36)
        out.append(chars[r])
    return "c" + "".join(out)


def _source_set_name(source):
    """lib/utils/source.ts getSourceSetNameFromSource."""
    if not isinstance(source, str):
        source = js_string(source)
    if re.fullmatch(r"-?\d+", source):
        return "neurons"
    if "-" in source:
        return source[source.index("-") + 1:].split("__")[0]
    return source


def _source_latents(model_id, source):
    model = MODELS.get(model_id) if isinstance(model_id, str) else None
    if not model:
        return None
    ss = model["source_sets"].get(_source_set_name(source))
    return ss["sources"].get(source) if ss else None


def can_access_model_and_source_set(model_id, source_set_name):
    model = MODELS.get(model_id) if isinstance(model_id, str) else None
    return bool(model) and source_set_name in model["source_sets"]


def can_access_model_and_source(model_id, source):
    return _source_latents(model_id, source) is not None


# -------------------------------------------------------------------------------------
# Fixture construction
# -------------------------------------------------------------------------------------
FIXTURES = {}  # (modelId, layer, index string) -> fixture dict


def _build_fixture(model_id, layer, spec):
    index, desc, max_act, frac, triggers, phrases, pos_str, neg_str, examples = spec
    assert index < _source_latents(model_id, layer)
    f = {
        "modelId": model_id,
        "layer": layer,
        "index": str(index),
        "description": desc,
        "maxActApprox": max_act,
        "frac_nonzero": frac,
        "trigger_words": list(triggers),  # double-only
        "steered_phrases": list(phrases),  # double-only
        "pos_str": list(pos_str),
        "pos_values": [round(1.12 - 0.06 * i - 0.05 * _h(index, "pos", i), 4) for i in range(len(pos_str))],
        "neg_str": list(neg_str),
        "neg_values": [round(-0.95 + 0.05 * i + 0.04 * _h(index, "neg", i), 4) for i in range(len(neg_str))],
    }
    bos = MODELS[model_id]["bos"]
    scales = [1.0, 0.9, 0.81, 0.73, 0.66]
    records = []
    for j, text in enumerate(examples):
        toks = [bos] + [t for t, _ in tokenize(model_id, text)]
        weights = [(0.6 + 0.4 * _h(index, j, k, t)) if _norm(t) in f["trigger_words"] else 0.0
                   for k, t in enumerate(toks)]
        top = max(weights)
        assert top > 0, f"fixture {index} example {j} has no trigger token"
        peak = max_act * scales[j]
        values = [round(peak * w / top, 3) for w in weights]
        for k in range(1, len(values)):  # a little spill onto the token after a trigger
            if values[k] == 0 and weights[k - 1] > 0:
                values[k] = round(0.08 * peak * (0.5 + _h(index, j, k)), 3)
        mx = max(values)
        records.append({
            "id": _cuid(f"act:{model_id}:{layer}:{index}:{j}"),
            "tokens": toks,
            "dataIndex": None,
            "index": str(index),
            "layer": layer,
            "modelId": model_id,
            "dataSource": None,
            "maxValue": mx,
            "maxValueTokenIndex": values.index(mx),
            "minValue": min(values),
            "values": values,
            "dfaValues": [],
            "dfaTargetIndex": None,
            "dfaMaxValue": None,
            "zQIndices": [],
            "zKIndices": [],
            "zValues": [],
            "creatorId": PUBLIC_ACTIVATIONS_USER_ID,
            "createdAt": FIXTURE_CREATED_AT,
            "lossValues": [],
            "logitContributions": None,
            "binMin": None,
            "binMax": None,
            "binContains": None,
            "qualifyingTokenIndex": None,
        })
    records.sort(key=lambda r: -r["maxValue"])
    f["activations"] = records
    f["explanation"] = {
        "id": _cuid(f"exp:{model_id}:{layer}:{index}"),
        "description": desc,
        "explanationModelName": EXPLANATION_MODEL_NAME,
        "typeName": EXPLANATION_TYPE_NAME,
    }
    bins = 10
    f["freq_hist_data_bar_values"] = [round(max_act * (i + 0.5) / bins, 3) for i in range(bins)]
    f["freq_hist_data_bar_heights"] = [int(400 * (0.55 ** i) * (0.8 + 0.4 * _h(index, "fh", i))) for i in range(bins)]
    f["logits_hist_data_bar_values"] = [round(-1.0 + 2.0 * (i + 0.5) / bins, 3) for i in range(bins)]
    f["logits_hist_data_bar_heights"] = [int(1800 * math.exp(-((i - 4.5) ** 2) / 6)) for i in range(bins)]
    return f


for _spec in _LLAMA_SPECS:
    _f = _build_fixture(LLAMA, LLAMA_SOURCE, _spec)
    FIXTURES[(LLAMA, LLAMA_SOURCE, _f["index"])] = _f
for _spec in _GEMMA_SPECS:
    _f = _build_fixture(GEMMA, GEMMA_SOURCE, _spec)
    FIXTURES[(GEMMA, GEMMA_SOURCE, _f["index"])] = _f


# Every latent of a served source exists on the real service, fixture or not: an index in
# range without a fixture is a plain "filler" feature (an explanation, a top activation, no
# theme in steered text) so that calls naming it (feature 0's dashboard, say) succeed as they
# would live. Fillers never appear in search results or token overlays, which scan FIXTURES.
_FILLERS = {}


def _filler(model_id, layer, index):
    key = (model_id, layer, index)
    if key not in _FILLERS:
        if len(_FILLERS) > 4096:
            _FILLERS.clear()
        _FILLERS[key] = _build_fixture(model_id, layer, (
            index, f"miscellaneous tokens (filler feature {index} of the contract double)",
            round(2.0 + 20.0 * _h(model_id, layer, index), 2), round(0.0005 + 0.004 * _h(index, "frac"), 5),
            ["filler"], ["(filler)"], [" filler"], [" signal"],
            ["A filler sentence for the contract double."]))
    return _FILLERS[key]


def get_fixture(model_id, layer, index):
    if not isinstance(model_id, str) or not isinstance(layer, str):
        return None
    key = index if isinstance(index, str) else js_string(index)
    found = FIXTURES.get((model_id, layer, key))
    if found is not None:
        return found
    if not key.isdigit() or (model_id, layer) not in {(LLAMA, LLAMA_SOURCE), (GEMMA, GEMMA_SOURCE)}:
        return None
    number = int(key)
    if number >= _source_latents(model_id, layer) or str(number) != key:
        return None
    return _filler(model_id, layer, number)


def neuron_row(f):
    """The scalar columns of a Prisma Neuron row (prisma/schema.prisma)."""
    return {
        "modelId": f["modelId"],
        "layer": f["layer"],
        "index": f["index"],  # Neuron.index is a String column
        "sourceSetName": _source_set_name(f["layer"]),
        "creatorId": None,
        "createdAt": FIXTURE_CREATED_AT,
        "maxActApprox": f["maxActApprox"],
        "hasVector": False,
        "vector": [],  # §2 "vector (empty for SAE features)"
        "vectorLabel": None,
        "vectorDefaultSteerStrength": 10,
        "hookName": None,  # guess: set for vectors only
        "topkCosSimIndices": [],
        "topkCosSimValues": [],
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [],
        "correlated_features_pearson": [],
        "correlated_features_l1": [],
        "neg_str": f["neg_str"],
        "neg_values": f["neg_values"],
        "pos_str": f["pos_str"],
        "pos_values": f["pos_values"],
        "frac_nonzero": f["frac_nonzero"],
        "freq_hist_data_bar_heights": f["freq_hist_data_bar_heights"],
        "freq_hist_data_bar_values": f["freq_hist_data_bar_values"],
        "logits_hist_data_bar_heights": f["logits_hist_data_bar_heights"],
        "logits_hist_data_bar_values": f["logits_hist_data_bar_values"],
        "decoder_weights_dist": [],
        "umap_cluster": None,
        "umap_log_feature_sparsity": None,
        "umap_x": None,
        "umap_y": None,
    }


def _explanation_short(f):
    e = f["explanation"]
    return {"description": e["description"], "explanationModelName": e["explanationModelName"],
            "typeName": e["typeName"]}


def _explanation_full_row(f):
    """A whole Explanation row (getNeuronsForTopkSearcherExplanationOnly `include`)."""
    e = f["explanation"]
    return {
        "id": e["id"], "modelId": f["modelId"], "layer": f["layer"], "index": f["index"],
        "description": e["description"], "authorId": PUBLIC_ACTIVATIONS_USER_ID,
        "triggeredByUserId": None, "notes": None, "scoreV1": 0, "scoreV2": None,
        "umap_x": 0, "umap_y": 0, "umap_cluster": 0, "umap_log_feature_sparsity": 0,
        "typeName": e["typeName"], "explanationModelName": e["explanationModelName"],
        "createdAt": FIXTURE_CREATED_AT, "updatedAt": FIXTURE_CREATED_AT,
    }


def _take(acts, take):
    """Prisma `take` with orderBy maxValue desc (negative take counts from the end)."""
    if not take:
        return list(acts)
    return list(acts[:take]) if take > 0 else list(acts[take:])


def neuron_for_getneurons(f, acts_to_return=None):
    """lib/db/neuron.ts getNeurons: row + explanations {description, explanationModelName,
    typeName} + public activations (cut to actsToReturn)."""
    n = neuron_row(f)
    n["explanations"] = [_explanation_short(f)]
    n["activations"] = _take(f["activations"], acts_to_return)
    return n


def neuron_optimized(f):
    """lib/db/neuron.ts getNeuronOptimized, for GET /api/feature/..."""
    model = MODELS[f["modelId"]]
    ss = model["source_sets"][_source_set_name(f["layer"])]
    n = neuron_row(f)
    n["model"] = model["row"]
    n["lists"] = []
    n["creator"] = None
    n["source"] = {
        "id": f["layer"], "modelId": f["modelId"], "hasDashboards": True, "inferenceEnabled": True,
        "saelensConfig": None, "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None,
        "hfFolderId": None, "visibility": "PUBLIC", "defaultOfModelId": f["modelId"],
        "setName": _source_set_name(f["layer"]), "creatorId": PUBLIC_ACTIVATIONS_USER_ID,
        "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
        "num_prompts": None, "num_tokens_in_prompt": None, "dataset": None, "notes": None,
        "cosSimMatchModelId": None, "cosSimMatchSourceId": None, "createdAt": FIXTURE_CREATED_AT,
    }
    n["sourceSet"] = ss["row"]
    n["comments"] = []
    n["activations"] = list(f["activations"])  # all, sorted by maxValue desc
    e = f["explanation"]
    n["explanations"] = [{
        "id": e["id"], "description": e["description"],
        "explanationModelName": e["explanationModelName"], "typeName": e["typeName"],
        "scores": [],
        # a relation select {id, name}: null when no user triggered it
        "triggeredByUser": None,
    }]
    return n


def activation_on_token(f, token):
    if _norm(token) not in f["trigger_words"]:
        return 0.0
    return round(f["maxActApprox"] * (0.55 + 0.4 * _h(f["index"], "custom", _norm(token))), 3)


# =====================================================================================
# Deterministic "generation" for steering
# =====================================================================================
_TEMPLATES = [
    ['Sure! Here are a few thoughts on "{topic}".',
     "It helps to start with the basics and take things one step at a time.",
     "Many people find that a little planning goes a long way, and small habits add up.",
     "Stay curious, notice what works for you, and adjust as you go.",
     "Let me know if you would like more detail on any part of this."],
    ['Great question about "{topic}"!',
     "The simplest approach is usually the best one to begin with.",
     "Try a small first step today and see how it feels.",
     "It also helps to ask others what has worked for them.",
     "I am happy to go deeper if you tell me a little more."],
    ['Of course. Here is a short overview of "{topic}".',
     "First, think about what you want to achieve.",
     "Then, break it into small, manageable steps.",
     "Finally, review how it went and adjust as needed.",
     "Would you like a few concrete examples?"],
]


def _topic(messages):
    users = [m for m in messages if m.get("role") == "user"]
    src = users[-1]["content"] if users else (messages[-1]["content"] if messages else "")
    topic = " ".join(src.replace('"', "'").split()[:10]).rstrip(".!?,;:")
    return topic or "this"


def _variant(temperature, seed):
    if temperature == 0:
        return 0  # greedy: the seed does not matter
    return int(_h("variant", js_num_str(float(seed))) * 3) % 3


def _default_sentences(messages, temperature, seed, shift=0):
    t = _TEMPLATES[(_variant(temperature, seed) + shift) % len(_TEMPLATES)]
    topic = _topic(messages)
    return [s.replace("{topic}", topic) for s in t]


def _as_sentence(phrase):
    s = phrase[:1].upper() + phrase[1:]
    return s if s[-1:] in ".!?:" else s + "."


def _ordered_phrases(f, temperature, seed):
    phrases = list(f["steered_phrases"])
    if temperature != 0:
        random.Random(f"{js_num_str(float(seed))}:{f['index']}").shuffle(phrases)
    return phrases


def steering_ratios(model_id, features, strength_multiplier):
    """r = strength x strength_multiplier / maxActApprox, summed per feature (steering vectors
    add up)."""
    acc = {}
    for feat in features:
        f = get_fixture(feat["modelId"], feat["layer"], feat["index"])
        if f is None:
            continue
        r = feat["strength"] * strength_multiplier / f["maxActApprox"]
        key = (f["modelId"], f["layer"], f["index"])
        acc[key] = (f, acc.get(key, (f, 0.0))[1] + r)
    return sorted(acc.values(), key=lambda fr: (-fr[1], int(fr[0]["index"])))


def steered_words(messages, features, strength_multiplier, temperature, seed, model_id):
    """-> (words, degenerate). r < 0.5 everywhere: the default reply; 0.5 <= r < 6: the default
    with round(r) phrases woven in; 6 <= r <= 12: the theme takes over; r > 12: one token
    repeated; a negative |r| >= 0.5: another theme-free variation of the default."""
    base = _default_sentences(messages, temperature, seed)
    ratios = steering_ratios(model_id, features, strength_multiplier)
    positive = [(f, r) for f, r in ratios if r >= 0.5]
    if positive:
        f, r = positive[0]
        if r > 12:
            return [f["trigger_words"][0]], True
        phrases = _ordered_phrases(f, temperature, seed)
        if r >= 6:
            target = len(" ".join(base).split(" "))
            sentences, i = [], 0
            while len(" ".join(sentences).split(" ")) < target:
                sentences.append(_as_sentence(phrases[i % len(phrases)]))
                i += 1
        else:
            k = min(len(phrases), max(1, int(r + 0.5)))
            sentences = []
            for j, s in enumerate(base):
                if j < k:
                    sentences.append(_as_sentence(phrases[j]))
                sentences.append(s)
            sentences.extend(_as_sentence(p) for p in phrases[len(base): k])
        for f2, _r2 in positive[1:]:  # weaker features add one phrase each
            sentences.insert(min(2, len(sentences)), _as_sentence(_ordered_phrases(f2, temperature, seed)[0]))
        return " ".join(sentences).split(" "), False
    if any(r <= -0.5 for _f, r in ratios):
        return " ".join(_default_sentences(messages, temperature, seed, shift=1)).split(" "), False
    return " ".join(base).split(" "), False


def default_words(messages, temperature, seed):
    return " ".join(_default_sentences(messages, temperature, seed)).split(" ")


def chat_prompt(model_id, messages):
    if model_id == GEMMA:
        # guess: Gemma's template, "assistant" rendered as "model"
        turns = "".join(
            f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n{m['content'].strip()}<end_of_turn>\n"
            for m in messages
        )
        return "<bos>" + turns + "<start_of_turn>model\n"
    # Llama 3 template, as the brief shows it (no injected "Cutting Knowledge Date" system turn)
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    )
    return "<|begin_of_text|>" + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _end_of_turn(model_id):
    return "<end_of_turn>" if model_id == GEMMA else "<|eot_id|>"


def render_output(model_id, messages, words, n_tokens, degenerate, upto=None):
    """{raw, chatTemplate, logprobs} for the first `upto` words of a generation."""
    n = int(n_tokens)
    full = [words[0]] * n if degenerate else words[:n]
    complete = (not degenerate) and len(words) <= n
    shown = full if upto is None else full[:upto]
    text = " ".join(shown)
    raw = chat_prompt(model_id, messages) + text
    if upto is None and complete:
        raw += _end_of_turn(model_id)
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    chat.append({"role": "assistant", "content": text})
    return {"raw": raw, "chatTemplate": chat, "logprobs": None}  # §1 logprobs always null


def count_prompt_tokens(model_id, messages):
    return len(tokenize(model_id, chat_prompt(model_id, messages)))


# =====================================================================================
# State: rate-limit windows, request log, saved steer outputs
# =====================================================================================


class DoubleState:
    def __init__(self, steer_limit=None, search_limit=None):
        self.lock = threading.Lock()
        self.rate_limits = [list(e) for e in LIMITS["rate_limits"]]
        self.windows = {}
        self.log = []
        self.steer_db = {}  # the SteerOutput rows: cache key -> saved output
        # Whether steer-chat streams DEFAULT's first snapshots alone (POST /__contract/stream).
        self.split_streams = False
        if steer_limit is not None:
            self.set_limit("steer", steer_limit)
        if search_limit is not None:
            self.set_limit("search", search_limit)

    _LIMIT_NAMES = {"steer": "/api/steer", "search": "/api/explanation/search"}

    def set_limit(self, name, n):
        with self.lock:
            for e in self.rate_limits:
                if e[0] == self._LIMIT_NAMES[name]:
                    e[1] = int(n)

    def get_limits(self):
        with self.lock:
            table = dict((e[0], e[1]) for e in self.rate_limits)
        return {name: table[prefix] for name, prefix in self._LIMIT_NAMES.items()}

    def reset(self):
        with self.lock:
            self.windows.clear()
            self.log.clear()
            self.steer_db.clear()
            self.split_streams = False

    def record(self, method, path, body, api_key):
        with self.lock:
            self.log.append({"method": method, "path": path, "body": body, "x_api_key": api_key})

    def log_snapshot(self):
        with self.lock:
            return list(self.log)

    def charge(self, ip, pathname):
        """middleware.ts: charge every matching limiter in order until one refuses.
        -> (ok, remaining of the last limiter charged, refusing endpoint, its limit).
        An exact sliding log, not Upstash's two-window approximation."""
        now = time.monotonic()
        window = LIMITS["rate_window_s"]
        remaining = None
        with self.lock:
            for endpoint, limit in self.rate_limits:
                if not pathname.startswith(endpoint):
                    continue
                q = self.windows.setdefault((endpoint, ip), deque())
                while q and q[0] <= now - window:
                    q.popleft()
                if len(q) >= limit:
                    return False, remaining, endpoint, limit
                q.append(now)
                remaining = limit - len(q)
        return True, remaining, None, None

    def db_get(self, key):
        with self.lock:
            return self.steer_db.get(key)

    def db_put(self, key, value):
        with self.lock:
            self.steer_db[key] = value


# =====================================================================================
# Routes. Each returns Resp(status, body) or Sse(frames).
# =====================================================================================


class Resp:
    def __init__(self, status, body, headers=None):
        self.status, self.body, self.headers = status, body, headers or {}


class Sse:
    def __init__(self, frames):
        self.frames = frames  # iterable of dicts (may be empty: a stream that just ends)


def _server_fault():
    """lib/api-error.ts toErrorResponse for an unclassified error (e.g. JSON.parse failing
    outside the route's own try): 500 {error, message}."""
    return Resp(500, {"error": SERVER_FAULT_MESSAGE, "message": SERVER_FAULT_MESSAGE})


def _now_iso():
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _ms_key(messages):
    return json.dumps([{"content": m["content"], "role": m["role"]} for m in messages], ensure_ascii=False)


def route_steer_chat(state, raw, limit_remaining):
    try:
        body_json = parse_js_json(raw)  # `await request.json()` is outside the route's try
    except JsonParseError:
        return _server_fault()
    try:
        body = STEER_CHAT_SCHEMA.validate(body_json)
    except YupError as e:
        return Resp(400, {"message": e.message})
    if not isinstance(body, dict):  # null passes yup, then `body.modelId` throws
        return Resp(500, {"message": "Unknown Error"})

    model_id = body["modelId"]
    default_msgs, steered_msgs = body["defaultChatMessages"], body["steeredChatMessages"]
    total_default = sum(utf16_len(m["content"]) for m in default_msgs)
    total_steered = sum(utf16_len(m["content"]) for m in steered_msgs)
    max_chars = LIMITS["steer_prompt_chars"]
    if body["isAssistantAxis"]:
        max_chars = LIMITS["steer_prompt_chars_assistant_axis"]
    elif model_id in LIMITS["nnsight_models"]:
        max_chars = LIMITS["steer_prompt_chars_nnsight"]
    if total_default > max_chars or total_steered > max_chars:
        return Resp(400, {"message": ERROR_STEER_MAX_PROMPT_CHARS})

    model = MODELS.get(model_id)
    if not model:
        return Resp(404, {"message": ERROR_NOT_FOUND_MESSAGE})
    n_tokens = body["n_tokens"]
    if model["row"]["thinking"]:
        if n_tokens > LIMITS["steer_n_tokens_max_thinking"]:
            return Resp(400, {"message": f"For thinking models the max n_tokens is {LIMITS['steer_n_tokens_max_thinking']}"})
    elif body["isAssistantAxis"]:
        if n_tokens > LIMITS["steer_n_tokens_max_assistant_axis"]:
            return Resp(400, {"message": f"For assistant axis models the max n_tokens is {LIMITS['steer_n_tokens_max_assistant_axis']}"})
    elif model_id in LIMITS["nnsight_models"]:
        if n_tokens > LIMITS["steer_n_tokens_max_nnsight"]:
            return Resp(400, {"message": f"For large LLM models the max n_tokens is {LIMITS['steer_n_tokens_max_nnsight']}"})
    elif n_tokens > LIMITS["steer_n_tokens_max"]:
        return Resp(400, {"message": f"The max n_tokens for non-thinking models is {LIMITS['steer_n_tokens_max']}"})

    features = body["features"]
    for feat in features:  # neuronExistsAndUserHasAccess
        if not can_access_model_and_source_set(feat["modelId"], _source_set_name(feat["layer"])):
            return Resp(404, {"message": ERROR_NOT_FOUND_MESSAGE})
        f = get_fixture(feat["modelId"], feat["layer"], feat["index"])
        if f is None:  # an index >= the source's width
            return Resp(404, {"message": ERROR_NOT_FOUND_MESSAGE})

    settings = {k: body[k] for k in ("temperature", "n_tokens", "freq_penalty", "seed",
                                     "strength_multiplier", "steer_special_tokens", "steer_method")}
    result = {"STEERED": None, "DEFAULT": None, "id": None, "shareUrl": UNDEF,
              "limit": limit_remaining, "settings": settings}
    common = tuple(js_num_str(float(v)) if is_num(v) else js_string(v) for v in settings.values())
    default_key = ("DEFAULT", model_id, _ms_key(default_msgs)) + common
    steered_key = ("STEERED", model_id, _ms_key(steered_msgs)) + common + (
        tuple(sorted((ft["modelId"], ft["layer"], js_num_str(float(ft["index"])), js_num_str(float(ft["strength"])))
                     for ft in features)),)

    to_run = ["STEERED", "DEFAULT"]
    saved_default = state.db_get(default_key)
    if saved_default:
        result["DEFAULT"] = saved_default["output"]
        to_run.remove("DEFAULT")
    saved_steered = state.db_get(steered_key)
    if saved_steered:
        result["STEERED"] = saved_steered["output"]
        result["id"] = saved_steered["id"]
        result["shareUrl"] = f"{NEXT_PUBLIC_URL}/steer/{saved_steered['id']}"
        to_run.remove("STEERED")
    if not to_run:  # §1 "Both outputs cached -> plain JSON even with stream:true"
        return Resp(200, result)

    # "inference": features of another model than modelId are not loaded there (guess: 400)
    for feat in features:
        if feat["modelId"] != model_id:
            return Resp(400, {"message": f"Source {feat['layer']} is not loaded for model {model_id}"})
    token_limit = LIMITS["steer_prompt_token_limit"].get(model_id)
    too_long = None
    if token_limit is not None:
        for msgs in (steered_msgs, default_msgs):
            n = count_prompt_tokens(model_id, msgs)
            if n > token_limit:
                too_long = f"Text too long: {n} tokens, max is {token_limit}"
                break

    temperature, seed, mult = body["temperature"], body["seed"], body["strength_multiplier"]
    generated = {}

    def generate(kind):
        if kind == "DEFAULT":
            return default_msgs, default_words(default_msgs, temperature, seed), False
        words, degenerate = steered_words(steered_msgs, features, mult, temperature, seed, model_id)
        return steered_msgs, words, degenerate

    def save():
        for kind in to_run:
            msgs, words, degenerate = generated[kind]
            out = render_output(model_id, msgs, words, n_tokens, degenerate)
            result[kind] = out
            if kind == "DEFAULT":
                state.db_put(default_key, {"output": out})
            else:
                new_id = _cuid()
                state.db_put(steered_key, {"output": out, "id": new_id})
                result["id"] = new_id
                result["shareUrl"] = f"{NEXT_PUBLIC_URL}/steer/{new_id}"

    if body["stream"]:
        # With features: [] the streaming path still asks inference for STEERED, which errors
        # (fixed after this commit), and "a mid-stream error just ends the stream" (§1): the
        # double answers 200 text/event-stream with no frames. Same for the token cap.
        if not features or too_long:
            return Sse([])

        def frames():
            for kind in to_run:
                generated[kind] = generate(kind)
            steps = 5
            if state.split_streams and "DEFAULT" in to_run:
                # Two inference hosts: the default and the steered reply stream separately,
                # and the route forwards whichever answers first (steerCompletionChat), so
                # the first snapshots may hold a partial DEFAULT and no STEERED at all.
                msgs, words, degenerate = generated["DEFAULT"]
                length = int(n_tokens) if degenerate else min(len(words), int(n_tokens))
                for step in range(1, 3):
                    upto = max(1, math.ceil(length * step / steps))
                    early = dict(result)
                    early["STEERED"] = None
                    early["DEFAULT"] = render_output(model_id, msgs, words, n_tokens, degenerate, upto)
                    yield json.loads(dumps(early))
            for step in range(1, steps + 1):
                for kind in to_run:
                    msgs, words, degenerate = generated[kind]
                    length = int(n_tokens) if degenerate else min(len(words), int(n_tokens))
                    if step == steps:
                        result[kind] = render_output(model_id, msgs, words, n_tokens, degenerate)
                    else:
                        upto = max(1, math.ceil(length * step / steps))
                        result[kind] = render_output(model_id, msgs, words, n_tokens, degenerate, upto)
                yield json.loads(dumps(result))
            save()  # the final frame, after the DB save, adds id and shareUrl
            yield json.loads(dumps(result))

        return Sse(frames())

    if too_long:  # InferenceServerError: status and message passed through
        return Resp(400, {"message": too_long})
    if not features:  # route: no features -> only DEFAULT runs
        to_run = ["DEFAULT"] if "DEFAULT" in to_run else []
        if not to_run:
            return Resp(200, result)
    for kind in to_run:
        generated[kind] = generate(kind)
    save()
    return Resp(200, result)


_STOPWORDS = {"the", "and", "of", "a", "an", "to", "in", "such", "as", "at", "on", "or", "other",
              "with", "for", "like", "is", "are", "word", "words", "reference", "references"}


def _bag(text):
    bag = {}
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        if len(w) > 3 and w.endswith("s"):
            w = w[:-1]
        if w in _STOPWORDS or not w:
            continue
        bag[w] = bag.get(w, 0) + 1
    return bag


def _cosine(a, b):
    dot = sum(v * b.get(k, 0) for k, v in a.items())
    if not dot:
        return 0.0
    return dot / (math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values())))


def _search(candidates, query, offset):
    q = _bag(query)
    scored = [(round(_cosine(q, _bag(f["description"])), 6), f) for f in candidates]
    scored = [(c, f) for c, f in scored if c > 0]
    scored.sort(key=lambda cf: (-cf[0], cf[1]["modelId"], cf[1]["layer"], int(cf[1]["index"])))
    page = scored[offset: offset + LIMITS["search_page_size"]]
    out = []
    for c, f in page:
        e = f["explanation"]
        out.append({
            "modelId": f["modelId"], "layer": f["layer"], "index": f["index"],
            "description": e["description"], "explanationModelName": e["explanationModelName"],
            "typeName": e["typeName"], "cosine_similarity": c,
            "neuron": neuron_for_getneurons(f, LIMITS["search_acts_per_neuron"]),
        })
    return out


def _search_response(body, results):
    offset = body.get("offset") or 0
    has_more = len(results) == LIMITS["search_page_size"]
    return Resp(200, {"request": body, "results": results, "resultsCount": len(results),
                      "hasMore": has_more, "nextOffset": offset + len(results) if has_more else UNDEF})


def route_explanation_search(state, raw, by_model):
    try:
        body_json = parse_js_json(raw)
    except JsonParseError:
        return _server_fault()
    if not js_truthy(body_json):
        return Resp(400, {"message": "Invalid JSON body"})
    schema = EXPLANATION_SEARCH_MODEL_SCHEMA if by_model else EXPLANATION_SEARCH_SCHEMA
    try:
        body = schema.validate(body_json)
    except YupError as e:
        return Resp(400, {"message": e.message})
    try:
        offset = int(body.get("offset") or 0)
        if offset < 0:
            raise ValueError("OFFSET must not be negative")
        model_id = body["modelId"]
        if by_model:
            # searchExplanationsModelVec: no access error, just the accessible sources' rows
            candidates = [f for f in FIXTURES.values() if f["modelId"] == model_id]
        else:
            layers = body["layers"]
            if not layers:
                raise ValueError("no layers")
            sets = {_source_set_name(l) for l in layers}
            if len(sets) == 1:
                if not can_access_model_and_source_set(model_id, sets.pop()):
                    raise ValueError("not found")
            else:
                for layer in layers:
                    if not can_access_model_and_source(model_id, layer):
                        raise ValueError("not found")
            candidates = [f for f in FIXTURES.values() if f["modelId"] == model_id and f["layer"] in layers]
        return _search_response(body, _search(candidates, body["query"], offset))
    except Exception:  # §2 "Any other error, including an unknown model or source, gives 500"
        return Resp(500, {"message": "Unknown Error"})


def route_feature(state, model_id, layer, index):
    if not can_access_model_and_source(model_id, layer):
        # assertUserCanAccessModelAndSource throws notFound -> api-error: 404 {error, message}
        return Resp(404, {"error": ERROR_NOT_FOUND_MESSAGE, "message": ERROR_NOT_FOUND_MESSAGE})
    f = get_fixture(model_id, layer, index)
    if f is None:
        return Resp(404, {"error": ERROR_NOT_FOUND_MESSAGE})
    return Resp(200, neuron_optimized(f))


def route_features(state, raw):
    try:
        body_json = parse_js_json(raw)
    except JsonParseError:
        return _server_fault()
    if not js_truthy(body_json):
        return Resp(400, {"message": "Invalid JSON body"})
    try:
        req = FEATURES_SCHEMA.validate(body_json)
    except YupError as e:
        return Resp(400, {"message": e.message})
    try:
        if not js_truthy(req):
            return Resp(400, {"message": "Invalid JSON body"})
        acts = req[0].get("maxActsToReturn")  # only the first item's counts ([] -> TypeError)
        found, seen = [], set()
        for item in req:
            key = (item["modelId"], item["layer"], js_num_str(float(item["index"])))
            if key in seen:
                continue
            seen.add(key)
            f = get_fixture(*key) if can_access_model_and_source(item["modelId"], item["layer"]) else None
            if f is not None:
                found.append(f)

        def order(f):  # features.findIndex((f) => f.index === parseInt(a.index))
            for i, item in enumerate(req):
                if item["index"] == int(f["index"]):
                    return i
            return -1

        found.sort(key=order)
        return Resp(200, [neuron_for_getneurons(f, int(acts) if acts else None) for f in found])
    except Exception:
        return Resp(500, {"message": "Unknown Error"})


def _activation_result(f, model_id, text, limit, ignore_bos, echo, batch_suffix=""):
    toks = tokenize_with_bos(model_id, text)
    if len(toks) > limit:
        raise ValueError(f"Text too long: {len(toks)} tokens, max is {limit}{batch_suffix}")
    tokens = [t for t, _ in toks]
    values = [0.0 if special else activation_on_token(f, t) for t, special in toks]
    if ignore_bos and toks and toks[0][1]:  # dropBosFromActivation
        tokens, values = tokens[1:], values[1:]
    mx = max(values) if values else 0
    return {
        "tokens": tokens,
        "values": values,
        "maxValue": mx,
        "minValue": min(values) if values else 0,
        "modelId": echo["modelId"],
        "layer": echo["layer"],
        "index": echo["index"],
        "creatorId": "",  # user?.id || ''
        "dataIndex": None,
        "dataSource": "Neuronpedia",  # lib/utils/inference.ts getActivationForFeature
        "maxValueTokenIndex": values.index(mx) if values else -1,
        "createdAt": _now_iso(),
    }


def route_activation_new(state, raw):
    """Everything that goes wrong here escapes the route and becomes api-error's 500
    {error, message}, except the access check, which the route catches: 500 {message}."""
    try:
        body = parse_js_json(raw)
    except JsonParseError:
        return _server_fault()
    if not isinstance(body, dict):
        return _server_fault()  # destructuring null / reading .layer of undefined
    neuron = body.get("neuron")
    if not js_truthy(neuron):
        neuron = body.get("feature")
    if not isinstance(neuron, dict):
        return _server_fault()
    layer = neuron.get("layer") if js_truthy(neuron.get("layer")) else neuron.get("source")
    model_id, index = neuron.get("modelId"), neuron.get("index")
    if not js_truthy(model_id) or not js_truthy(layer) or not js_truthy(index):
        return _server_fault()  # 'Invalid feature.'
    custom = body.get("customText")
    if not js_truthy(custom):
        return _server_fault()  # 'Missing custom text.'
    if not can_access_model_and_source_set(model_id, _source_set_name(layer)):
        return Resp(500, {"message": ERROR_NOT_FOUND_MESSAGE})
    # inference: the source must be loaded and the feature known to the double
    f = get_fixture(model_id, layer, index)
    if f is None:
        return _server_fault()
    ignore_bos = body.get("ignoreBos") is True
    echo = {"modelId": model_id, "layer": layer, "index": index}
    limit = LIMITS["activation_token_limit"][model_id]
    try:
        if isinstance(custom, list):
            # inference 400s ("At least one prompt is required", "Batch size N exceeds maximum
            # of 4", 422 for non-strings) come back as InferenceServerError, which this route
            # does not catch: 500 {error, message}
            if not custom or len(custom) > LIMITS["activation_batch_max"] or not all(isinstance(t, str) for t in custom):
                return _server_fault()
            per = limit / LIMITS["activation_batch_max"]
            return Resp(200, [_activation_result(f, model_id, t, per, ignore_bos, echo, " for batch requests")
                              for t in custom])
        if not isinstance(custom, str):
            return _server_fault()  # 422 from inference
        return Resp(200, _activation_result(f, model_id, custom, limit, ignore_bos, echo))
    except ValueError:
        return _server_fault()


def _topk_for_prompt(model_id, source, text, top_k, ignore_bos, limit, suffix=""):
    toks = tokenize_with_bos(model_id, text)
    if len(toks) > limit:
        raise _TopkError(f"Text too long: {len(toks)} tokens, max is {limit}{suffix}")
    feats = [f for f in FIXTURES.values() if f["modelId"] == model_id and f["layer"] == source]
    offset = 1 if ignore_bos else 0
    results = []
    for pos in range(offset, len(toks)):
        token, special = toks[pos]
        acts = [] if special else [(activation_on_token(f, token), f) for f in feats]
        acts = sorted([(v, f) for v, f in acts if v > 0], key=lambda vf: (-vf[0], int(vf[1]["index"])))
        results.append({"position": pos, "token": token, "isSpecial": special,
                        "topFeatures": [(v, f) for v, f in acts[:top_k]]})
    return results


class _TopkError(Exception):
    pass


def route_search_topk(state, raw):
    try:  # here the JSON parse is inside the route's try: 500 {message: error.message}
        try:
            body_json = parse_js_json(raw)
        except JsonParseError as e:
            return Resp(500, {"message": str(e)})
        try:
            body = TOPK_SCHEMA.validate(body_json)
        except YupError as e:
            return Resp(400, {"message": e.message})
        if not isinstance(body, dict):
            return Resp(500, {"message": f"Cannot destructure property 'modelId' of 'body' as it is {js_string(body)}."})
        model_id, source, text = body["modelId"], body["source"], body["text"]
        if not isinstance(text, (str, list)):
            return Resp(500, {"message": "text must be a string or array of strings."})
        density = body["densityThreshold"] if js_truthy(body["densityThreshold"]) else -1
        if density != -1 and (density <= 0 or density >= 1):
            return Resp(500, {"message": "densityThreshold must be between 0 and 1."})
        if not can_access_model_and_source(model_id, source):
            return Resp(500, {"message": ERROR_NOT_FOUND_MESSAGE})
        # inference (pydantic): numResults must be an int (null -> DEFAULT_TOP_K), ignoreBos a bool
        num = body["numResults"]
        if num is None:
            num = LIMITS["topk_inference_default_top_k"]
        if not float(num).is_integer() or body["ignoreBos"] is None:
            return Resp(500, {"message": "Unprocessable Entity"})
        top_k = max(1, int(num))
        ignore_bos = body["ignoreBos"]
        limit = LIMITS["activation_token_limit"][model_id]
        if isinstance(text, list):
            if not text:
                return Resp(500, {"message": "At least one prompt is required"})
            if len(text) > LIMITS["activation_batch_max"]:
                return Resp(500, {"message": f"Batch size {len(text)} exceeds maximum of {LIMITS['activation_batch_max']}"})
            if not all(isinstance(t, str) for t in text):
                return Resp(500, {"message": "Unprocessable Entity"})
            per = limit / LIMITS["activation_batch_max"]
            out = []
            for t in text:
                rows = _topk_for_prompt(model_id, source, t, top_k, ignore_bos, per, " for batch requests")
                for r in rows:  # batch: no isSpecial filter, no density filter, feature undefined
                    r["topFeatures"] = [{"activationValue": v, "featureIndex": int(f["index"])} for v, f in r["topFeatures"]]
                out.append({"source": source, "results": rows})
            return Resp(200, {"results": out})
        rows = _topk_for_prompt(model_id, source, text, top_k, ignore_bos, limit)
        if ignore_bos:
            rows = [r for r in rows if not r["isSpecial"]]
        for r in rows:
            feats = r["topFeatures"]
            if density != -1:
                feats = [(v, f) for v, f in feats if f["frac_nonzero"] and f["frac_nonzero"] <= density]
            r["topFeatures"] = [{
                "activationValue": v, "featureIndex": int(f["index"]),
                "feature": dict(neuron_row(f), explanations=[_explanation_full_row(f)]),
            } for v, f in feats]
        return Resp(200, {"source": source, "results": rows})
    except _TopkError as e:
        return Resp(500, {"message": str(e)})
    except Exception:
        return Resp(500, {"message": "Unknown Error"})


# Known routes: path -> allowed methods (Next.js answers other methods 405: guess, empty body)
_POST_ROUTES = {
    "/api/steer-chat": route_steer_chat,
    "/api/explanation/search": lambda s, raw, _lim: route_explanation_search(s, raw, False),
    "/api/explanation/search-model": lambda s, raw, _lim: route_explanation_search(s, raw, True),
    "/api/features": lambda s, raw, _lim: route_features(s, raw),
    "/api/activation/new": lambda s, raw, _lim: route_activation_new(s, raw),
    "/api/search-topk-by-token": lambda s, raw, _lim: route_search_topk(s, raw),
}
_FEATURE_ROUTE = re.compile(r"/api/feature/([^/]+)/([^/]+)/([^/]+)\Z")

# =====================================================================================
# HTTP
# =====================================================================================
CORS_HEADERS = (  # §4, exactly; no Access-Control-Expose-Headers
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST"),
    ("Access-Control-Allow-Headers", "Content-Type"),
)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "contract-double"
    timeout = 60  # idle keep-alive connections give their thread back

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_OPTIONS(self):
        self._handle("OPTIONS")

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    # -- plumbing ---------------------------------------------------------------------
    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b""
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _write(self, status, body_bytes, headers, api):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if api:
            for k, v in CORS_HEADERS:
                self.send_header(k, v)
            if self._remaining is not None:
                self.send_header("x-limit-remaining", str(self._remaining))
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body_bytes)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body_bytes)

    def _json(self, status, obj, api=True, extra=()):
        self._write(status, dumps(obj).encode("utf-8"), [("Content-Type", "application/json")] + list(extra), api)

    def _sse(self, frames):
        self.send_response(200)
        for k, v in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache, no-transform"),
                     ("Connection", "keep-alive"), ("Transfer-Encoding", "chunked")):
            self.send_header(k, v)
        for k, v in CORS_HEADERS:
            self.send_header(k, v)
        if self._remaining is not None:
            self.send_header("x-limit-remaining", str(self._remaining))
        self.end_headers()
        try:
            for i, frame in enumerate(frames):
                if i:
                    time.sleep(0.03)
                data = f"data: {dumps(frame)}\n\n".encode("utf-8")
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- dispatch -----------------------------------------------------------------------
    def _handle(self, method):
        try:
            self._dispatch(method)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug in the double: say so loudly, answer like an unclassified error
            import traceback

            traceback.print_exc()
            try:
                self._json(500, {"error": SERVER_FAULT_MESSAGE, "message": SERVER_FAULT_MESSAGE})
            except Exception:
                self.close_connection = True

    def _dispatch(self, method):
        state = self.server.state
        self._remaining = None
        split = urlsplit(self.path)
        path = split.path
        raw = self._read_body()
        if path.startswith(CONTROL_PREFIX):
            return self._control(state, method, path, raw)
        try:
            logged = parse_js_json(raw) if raw else None
        except JsonParseError:
            logged = None
        state.record(method, self.path, logged, self.headers.get("x-api-key"))

        lower = path.lower()
        api = lower.startswith("/api")
        if path != "/" and path.endswith("/"):
            # guess: Next.js's trailing-slash 308 happens before the middleware (no CORS, no charge)
            location = path.rstrip("/") + (f"?{split.query}" if split.query else "")
            return self._write(308, b"", [("Location", location)], False)

        ok, remaining, endpoint, limit = state.charge(self.client_address[0], lower)
        if not ok:  # §0 429, no CORS headers (§4: a browser sees a network error)
            return self._json(429, {
                "endpoint": endpoint,
                "limitPerWindow": limit,
                "requestWindow": RATE_LIMIT_WINDOW,
                "remainingRequests": 0,
                "error": (f"Rate limit exceeded for this endpoint. The limit for this endpoint ({endpoint}) "
                          f"is {limit} requests per {RATE_LIMIT_WINDOW}. Contact {CONTACT_EMAIL_ADDRESS} "
                          "to increase your rate limit."),
            }, api=False)
        self._remaining = remaining if api else None

        if not api:
            return self._write(404, b"Not Found", [("Content-Type", "text/plain")], False)
        if method == "OPTIONS":
            # §4: no route exports OPTIONS; Next.js answers it (204) and the middleware adds CORS.
            # Preflights are charged above like any request (§4 "probably use rate-limit budget").
            return self._write(204, b"", [("Allow", "GET, HEAD, OPTIONS, POST")], True)

        m = _FEATURE_ROUTE.match(path)
        if m:
            if method != "GET":
                return self._write(405, b"", [("Allow", "GET, HEAD, OPTIONS")], True)
            model_id, layer, index = (unquote(g) for g in m.groups())
            resp = route_feature(state, model_id, layer, index)
            return self._json(resp.status, resp.body)
        route = _POST_ROUTES.get(path)
        if route is None:
            # guess: the real service answers its HTML 404 page; the double sends 404 {error}
            return self._json(404, {"error": "Not Found"})
        if method != "POST":
            return self._write(405, b"", [("Allow", "OPTIONS, POST")], True)
        resp = route(state, raw, None if remaining is None else str(remaining))
        if isinstance(resp, Sse):
            return self._sse(resp.frames)
        return self._json(resp.status, resp.body)

    def _control(self, state, method, path, raw):
        if path == "/__contract/reset" and method == "POST":
            state.reset()
            return self._json(200, {"ok": True}, api=False)
        if path == "/__contract/log" and method == "GET":
            return self._json(200, state.log_snapshot(), api=False)
        if path == "/__contract/stream" and method == "POST":
            body = json.loads(raw.decode("utf-8") or "{}")
            state.split_streams = bool(body.get("split"))
            return self._json(200, {"split": state.split_streams}, api=False)
        if path == "/__contract/limits" and method == "GET":
            return self._json(200, state.get_limits(), api=False)
        if path == "/__contract/limits" and method == "POST":
            try:
                body = json.loads(raw.decode("utf-8") or "{}")
                if not isinstance(body, dict):
                    raise ValueError("expected an object")
                for name in ("steer", "search"):
                    v = body.get(name)
                    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                        raise ValueError(f"{name} must be a non-negative integer")
            except ValueError as e:
                return self._json(400, {"error": str(e)}, api=False)
            for name in ("steer", "search"):
                if body.get(name) is not None:
                    state.set_limit(name, body[name])
            return self._json(200, state.get_limits(), api=False)
        return self._json(404, {"error": "unknown control endpoint"}, api=False)


class ContractDoubleServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, state, verbose=False):
        super().__init__(address, Handler)
        self.state = state
        self.verbose = verbose

    @property
    def base_url(self):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def start_server(host="127.0.0.1", port=0, steer_limit=None, search_limit=None, verbose=False):
    """Start the double in a background thread. -> the server (.base_url, .state,
    .shutdown(), .server_close())."""
    server = ContractDoubleServer((host, port), DoubleState(steer_limit, search_limit), verbose)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="contract-double",
                     daemon=True).start()
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description="A contract double of Neuronpedia's API, never the real service.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--port-file", help="write the chosen port to this file")
    p.add_argument("--steer-limit", type=int, help="per-hour limit of /api/steer* (default 240)")
    p.add_argument("--search-limit", type=int, help="per-hour limit of /api/explanation/search* (default 200)")
    p.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = p.parse_args(argv)
    server = ContractDoubleServer((args.host, args.port), DoubleState(args.steer_limit, args.search_limit), args.verbose)
    port = server.server_address[1]
    if args.port_file:
        tmp = f"{args.port_file}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"contract double listening on http://{args.host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
