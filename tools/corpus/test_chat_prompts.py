"""Unit tests for chat_prompts.py on a small stand-in corpus (no downloads, no model).

Run: python3 -m unittest discover -s tools/corpus -p 'test_*.py'
"""

import json
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chat_prompts as cp  # noqa: E402

DOCS = {
    "chitchat": ["A: Have you ever been to Paris?\nB: Yes, last spring.", "A: hi\nB: hello"],
    "chatterbot": ["Q: What is AI?\nA: A field of computer science."],
    "bbc-news": ["Markets rally\n\n" + "Shares rose sharply on Monday as investors cheered. " * 30],
    "fortunes": ["A fool and his money are soon parted."],
    "popquotes": ["Homer: Mmm, donuts."],
    "wordnet": ["serendipity (noun): good luck in making unexpected discoveries."],
}


class ChatPrompts(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.corpus = Path(self.dir.name)
        for name, docs in DOCS.items():
            with (self.corpus / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps({"text": d, "source": name}) + "\n")

    def tearDown(self):
        self.dir.cleanup()

    def test_deterministic_for_a_seed(self):
        self.assertEqual(cp.build(self.corpus, 200, 1), cp.build(self.corpus, 200, 1))
        self.assertNotEqual(cp.build(self.corpus, 200, 1), cp.build(self.corpus, 200, 2))

    def test_every_kind_and_persona_variety(self):
        prompts = cp.build(self.corpus, 2000, 1234)
        self.assertEqual([p["id"] for p in prompts], list(range(2000)))
        kinds = {p["kind"] for p in prompts}
        self.assertEqual(kinds, {k for k, _ in cp.KIND_SHARES})
        systems = {p["system"] for p in prompts}
        self.assertIn(None, systems)  # some use the template's default system prompt
        self.assertGreater(len(systems), 100)
        self.assertGreater(len({p["user"] for p in prompts if p["kind"] == "template"}), 500)

    def test_corpus_prompts_use_the_documents(self):
        pools = cp.corpus_prompts(self.corpus, cp.random.Random(0))
        self.assertEqual(pools["human-opener"], ["Have you ever been to Paris?"])  # "hi" is too short
        self.assertEqual(pools["chatterbot-question"], ["What is AI?"])
        self.assertTrue(pools["news-task"][0].endswith(" ..."))  # long articles are clipped
        self.assertTrue(any("serendipity" in w for w in pools["word-task"]))

    def test_missing_corpus_is_a_clear_error(self):
        with self.assertRaises(SystemExit) as e:
            cp.build(self.corpus / "nope", 10, 1)
        self.assertIn("build the general-text corpus first", str(e.exception))


if __name__ == "__main__":
    unittest.main()
