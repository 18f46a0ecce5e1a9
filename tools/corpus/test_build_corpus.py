"""Unit tests for the pure text functions of build_corpus.py (stdlib unittest, no downloads, no tokenizer).

Run: python3 -m unittest discover -s tools/corpus -p 'test_*.py'
"""

import gzip
import json
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_corpus as bc  # noqa: E402


class WhitespaceAndCharacters(unittest.TestCase):
    def test_normalize_ws(self):
        self.assertEqual(bc.normalize_ws("  a \t b  \n\n\n\n  c  \n"), "a b\n\nc")
        self.assertEqual(bc.normalize_ws(" a\n b\t\tc ", keep_newlines=False), "a b c")

    def test_normalize_ws_keep_indent(self):
        self.assertEqual(bc.normalize_ws("def f():\n    return  1\n", keep_indent=True), "def f():\n    return 1")

    def test_backspaces(self):
        self.assertEqual(bc.apply_backspaces("_\bx and ___\b\b\ball"), "x and all")

    def test_clean_chars(self):
        self.assertEqual(bc.clean_chars("a\r\nb\x07\u200bc\u00a0d"), "a\nbc d")

    def test_mojibake(self):
        self.assertEqual(bc.fix_mojibake("don\u00e2\u0080\u0099t"), "don\u2019t")  # once
        self.assertEqual(bc.fix_mojibake("don\u00c3\u00a2\u00c2\u0080\u00c2\u0099t"), "don\u2019t")  # twice
        self.assertEqual(bc.fix_mojibake("café £5"), "café £5")  # real text is left alone

    def test_decode_bytes_falls_back_per_byte(self):
        self.assertEqual(bc.decode_bytes("é ".encode() + b"\xa315m"), "é £15m")

    def test_reflow_joins_wrapped_prose_only(self):
        prose = (
            "This is a long line of prose that was wrapped by hand at about seventy\n"
            "columns, and this is its continuation which ends the paragraph.\n"
            "\n"
            "Roses are red,\n"
            "violets are blue.\n"
        )
        out = bc.reflow(prose)
        self.assertEqual(
            out,
            "This is a long line of prose that was wrapped by hand at about seventy columns, and this is its "
            "continuation which ends the paragraph.\n\nRoses are red,\nviolets are blue.",
        )

    def test_reflow_keeps_attribution_and_indented_paragraphs(self):
        text = (
            "A fellow bought a new car, a Nissan, and was quite happy with his purchase.\n"
            "He was something of an animist, however, and felt that the car ought to\n"
            "have a name.\n"
            "\tAfter considerable thought, he settled on naming the car Belchazar or\n"
            "Beaumadine.\n"
            "\t\t-- Anonymous\n"
        )
        out = bc.normalize_ws(bc.reflow(text))
        self.assertEqual(
            out.split("\n"),
            [
                "A fellow bought a new car, a Nissan, and was quite happy with his purchase. He was something of "
                "an animist, however, and felt that the car ought to have a name.",
                "After considerable thought, he settled on naming the car Belchazar or Beaumadine.",
                "-- Anonymous",
            ],
        )

    def test_garbage(self):
        self.assertTrue(bc.is_garbage(""))
        self.assertTrue(bc.is_garbage("short"))
        self.assertTrue(bc.is_garbage("  /\\_/\\  ( o.o )  > ^ <  |||| ---- ####"))
        self.assertFalse(bc.is_garbage("A perfectly ordinary English sentence."))

    def test_dedupe_keeps_first(self):
        self.assertEqual(bc.dedupe(["b", "a", "b", "c", "a"]), ["b", "a", "c"])


class Brown(unittest.TestCase):
    def test_strip_tags(self):
        self.assertEqual(
            bc.brown_strip_tags("The/at Fulton/np-tl jury/nn said/vbd 1/2/cd ./. **zg/nn"),
            ["The", "Fulton", "jury", "said", "1/2", "."],
        )

    def test_detokenize(self):
        words = ["He", "said", "``", "no", "evidence", "''", ",", "(", "really", ")", "--", "and", "left", "."]
        self.assertEqual(bc.detokenize(words), 'He said "no evidence," (really) -- and left.')

    def test_detokenize_collapses_doubled_semicolons(self):
        self.assertEqual(bc.detokenize(["Ann", ";", ";", "each", "day"]), "Ann; each day")

    def test_document_paragraphs_and_headlines(self):
        raw = (
            "\n\n\tThe/at jury/nn said/vbd ``/`` yes/rb ''/'' ./.\n"
            "It/pps was/bedz late/jj ./.\n\n\n"
            "Merger/nn-hl proposed/vbn-hl \n"
            "\tA/at new/jj paragraph/nn ?/.\n"
        )
        self.assertEqual(bc.brown_document(raw), 'The jury said "yes." It was late.\n\nMerger proposed\n\nA new paragraph?')


class Fortunes(unittest.TestCase):
    def test_split_on_percent_lines(self):
        raw = "First fortune,\nsecond line.\n%\n  Second   one.\n\t\t-- Author\n%\n%\n100% sure\n%\n"
        self.assertEqual(bc.split_fortunes(raw), ["First fortune,\nsecond line.", "Second one.\n-- Author", "100% sure"])


class Dialogue(unittest.TestCase):
    def test_chitchat(self):
        data = {
            "c2": {"messages": [[{"sender": "x", "text": "only one turn"}]]},
            "c1": {
                "messages": [
                    [{"sender": "u1", "text": "Hello"}, {"sender": "u1", "text": " how are  you? "}],
                    [{"sender": "u2", "text": "fine"}],
                    [{"sender": "u1", "text": "good"}],
                ]
            },
        }
        self.assertEqual(list(bc.chitchat_documents(data)), ["A: Hello how are you?\nB: fine\nA: good"])

    def test_render_dialogue(self):
        self.assertEqual(bc.render_dialogue(["hi", "hello  there", "bye"]), "A: hi\nB: hello there\nA: bye")

    def test_chatterbot_yaml(self):
        text = (
            "categories:\n- AI\nconversations:\n"
            "- - What is AI?\n  - Artificial Intelligence is a branch\n    of science.\n"
            "- - 'Single ''quoted'''\n  - \"Double \\\"quoted\\\"\"\n  - third turn\n"
            "- - code?\n  - |\n    Sure:\n\n    ```\n    def f():\n        return 1\n    ```\n"
        )
        convs = bc.parse_chatterbot_yaml(text)
        self.assertEqual(convs[0], ["What is AI?", "Artificial Intelligence is a branch of science."])
        self.assertEqual(convs[1], ["Single 'quoted'", 'Double "quoted"', "third turn"])
        self.assertEqual(convs[2][1], "Sure:\n\n```\ndef f():\n    return 1\n```")
        self.assertEqual(bc.render_qa(convs[1]), "Q: Single 'quoted'\nA: Double \"quoted\"\nQ: third turn")
        self.assertEqual(bc.render_qa(convs[2]), "Q: code?\nA: Sure:\n\n```\ndef f():\n    return 1\n```")


class Dictionaries(unittest.TestCase):
    def test_dictd_index(self):
        self.assertEqual(bc.dictd_b64("A"), 0)
        self.assertEqual(bc.dictd_b64("Bd"), 64 + 29)
        data = b"00-header\nalpha\n text one\nbeta\n text two\n"
        a, b = data.index(b"alpha"), data.index(b"beta")
        enc = lambda n: bc._B64[n // 64] + bc._B64[n % 64]  # noqa: E731
        index = (
            f"00-database-info\t{enc(0)}\t{enc(10)}\n"
            f"alpha\t{enc(a)}\t{enc(b - a)}\nalias\t{enc(a)}\t{enc(b - a)}\nbeta\t{enc(b)}\t{enc(len(data) - b)}\n"
        )
        self.assertEqual(bc.dictd_entries(index, data), [("alpha", "alpha\n text one\n"), ("beta", "beta\n text two\n")])

    def test_jargon(self):
        entry = "kahuna\n /k@·hoo'n@/, n.\n\n    [IBM: from the Hawaiian title for a shaman] Synonym for {wizard},\n    {guru}.\n\n    K\n"
        self.assertEqual(bc.clean_jargon_entry(entry), "kahuna, n.\n\n[IBM: from the Hawaiian title for a shaman] Synonym for wizard, guru.")

    def test_gcide(self):
        entry = (
            "Ferment \\Fer*ment\"\\ (f[~e]r`m[e^]nt), v. i. [L. fermentare. See {Ferment}, n.]\n"
            "   To undergo fermentation; to be in motion, or to be excited into sensible\n"
            "   internal motion. See {Ferment[1]}. [Obs.]\n"
            "   [1913 Webster]\n"
            "\n"
            "            But finding no redress, ferment and rage. --Milton.\n"
            "      [1913 Webster]\n"
        )
        self.assertTrue(bc.gcide_has_quotation(entry))
        self.assertFalse(bc.gcide_has_quotation("Husbandly \\Hus\"band*ly\\, a.\n   Frugal; thrifty. [R.] --Tusser.\n"))
        self.assertEqual(
            bc.clean_gcide_entry(entry),
            "Ferment, v. i.\nTo undergo fermentation; to be in motion, or to be excited into sensible internal motion. "
            "See Ferment. [Obs.]\n\nBut finding no redress, ferment and rage. --Milton.",
        )
        self.assertEqual(bc.clean_gcide_entry("Torul[ae] \\Tor\"u*l[ae]\\, n. pl.\n   The [oe]uvre [a^]t x.\n"),
                         "Torulæ, n. pl.\nThe œuvre at x.")

    def test_wordnet(self):
        line = ('00095794 00 s 02 viable(a) 0 feasible 0 002 & 00095301 a 0000 | capable of life or normal '
                'growth; "viable seeds"; "a viable fetus"  ')
        self.assertEqual(bc.wordnet_document(line),
                         'viable, feasible (adjective): capable of life or normal growth.\n'
                         'Examples: "viable seeds"; "a viable fetus".')
        self.assertIsNone(bc.wordnet_document("  1 This software and database is being provided"))

    def test_popquote(self):
        self.assertEqual(bc.clean_popquote("Ned: [_strained_] Heh. _That_ one.", "simpsons"), "Ned: [strained] Heh. That one.")
        self.assertEqual(bc.clean_popquote("Bart: Hey [_it's [1F16][1]_]\n\n   [1]: 1F16.html", "simpsons"),
                         "Bart: Hey [it's 1F16]")
        self.assertEqual(bc.clean_popquote("I'm sorry, Frank.", "hal"), "HAL: I'm sorry, Frank.")


class Sampling(unittest.TestCase):
    def test_deterministic_and_under_budget(self):
        sizes = [10.0] * 100
        a = bc.select_under_budget(sizes, 250, 1234, "x")
        b = bc.select_under_budget(sizes, 250, 1234, "x")
        self.assertEqual(a, b)
        self.assertEqual(len(a), 25)
        self.assertEqual(a, sorted(a))
        self.assertNotEqual(a, bc.select_under_budget(sizes, 250, 1234, "y"))
        self.assertNotEqual(a, bc.select_under_budget(sizes, 250, 99, "x"))
        self.assertTrue(set(a) < set(bc.select_under_budget(sizes, 400, 1234, "x")))  # prefix property
        self.assertEqual(bc.select_under_budget(sizes, 10_000, 1234, "x"), list(range(100)))
        self.assertEqual(bc.select_under_budget(sizes, 0, 1234, "x"), [])

    def test_overshoot_is_at_most_one_document(self):
        sizes = [float(1 + (i * 37) % 50) for i in range(200)]
        chosen = bc.select_under_budget(sizes, 1000, 1234, "z")
        total = sum(sizes[i] for i in chosen)
        self.assertGreaterEqual(total, 1000)
        self.assertLess(total, 1000 + max(sizes))

    def test_allocate_budgets_redistributes_shortfall(self):
        shares = {"a": 0.5, "b": 0.3, "c": 0.2}
        self.assertEqual(bc.allocate_budgets(shares, {"a": 1e9, "b": 1e9, "c": 1e9}, 1000),
                         {"a": 500.0, "b": 300.0, "c": 200.0})
        got = bc.allocate_budgets(shares, {"a": 1e9, "b": 1e9, "c": 50}, 1000)
        self.assertEqual(got["c"], 50)
        self.assertAlmostEqual(got["a"], 950 * 0.5 / 0.8)
        self.assertAlmostEqual(got["b"], 950 * 0.3 / 0.8)
        self.assertAlmostEqual(sum(got.values()), 1000)


class Sources(unittest.TestCase):
    def test_shares_and_pins(self):
        self.assertAlmostEqual(sum(s.share for s in bc.SOURCES), 1.0)
        self.assertEqual(len({s.name for s in bc.SOURCES}), len(bc.SOURCES))
        for s in bc.SOURCES:
            for p in s.packages:
                self.assertRegex(p.sha256, r"^[0-9a-f]{64}$")
                self.assertIn(p.registry, ("pypi", "npm", "debian"))
        self.assertEqual(bc.SOURCES[0].packages[0].spec, "pypi:chitchat-dataset==0.9.0")


if __name__ == "__main__":
    unittest.main()
