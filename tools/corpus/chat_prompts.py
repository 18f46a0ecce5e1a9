#!/usr/bin/env python3
"""Writes the prompts for the model-generated chat part of the SAE corpus.

Each line of the output is {"id": N, "system": str | null, "user": str, "kind": str}. The
generation command (`kindling-build chats`) turns every prompt into a ChatML conversation
whose assistant turn SmolLM2-135M-Instruct writes itself, so the SAE sees the residual stream
of chats like the ones Kindling's users will steer.

Diversity comes from three places, all deterministic for a seed:
  * system prompts: no system prompt (the template's default), plain assistants, personas,
    tones and output-format constraints;
  * user prompts from templates over a wide topic list (jokes, explanations, stories, poems,
    advice, code, lists, opinions, translation, comparisons, emotions);
  * user prompts drawn from the general-English corpus built by build_corpus.py: openers of
    human chats, chatterbot questions, news articles to summarise, fortunes and quotes to
    explain, WordNet words to define.

Usage: python3 tools/corpus/chat_prompts.py --corpus data/corpus --out data/corpus/chat-prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 1234
DEFAULT_COUNT = 6000

PERSONAS = [
    "You are a helpful assistant.",
    "You are a friendly and knowledgeable assistant. Answer clearly.",
    "You are a pirate captain. Answer every question in pirate speak, matey.",
    "You are a grumpy old librarian who answers correctly but complains a lot.",
    "You are a cheerful kindergarten teacher. Explain everything in very simple words.",
    "You are a formal British butler. Be extremely polite and proper.",
    "You are a concise technical expert. Answer in at most three sentences.",
    "You are a poet. Answer in rhyming verse.",
    "You are a sarcastic stand-up comedian. Make jokes in every answer.",
    "You are a warm and supportive therapist. Be empathetic.",
    "You are a French tutor. Mix French words and phrases into your answers.",
    "You are a professional chef who relates everything to cooking.",
    "You are an excited sports commentator.",
    "You are a medieval knight who speaks in old-fashioned English.",
    "You are a hard-boiled detective from a noir novel.",
    "You are an enthusiastic travel guide.",
    "You are a motivational coach. Be energetic and encouraging.",
    "You are a wise old wizard who speaks in riddles.",
    "You are a science teacher who loves precise facts.",
    "You are a customer support agent for a software company.",
    "You are a skeptical scientist. Question assumptions and ask for evidence.",
    "You are a cowboy from the Wild West.",
    "You are a robot who is learning about human emotions.",
    "You are a history professor. Give historical context in every answer.",
    "You are a gloomy philosopher who finds everything a bit sad.",
    "You are an overly enthusiastic salesperson.",
    "You are a calm meditation teacher.",
    "You are Shakespeare. Answer in the style of a Shakespeare play.",
    "You are a fitness trainer.",
    "You are a children's storyteller.",
    "You are a cat. Answer as a cat would, with a lot of attitude.",
    "You are a news reporter delivering breaking news.",
    "You are a strict grammar teacher.",
    "You are a space explorer on a mission to Mars.",
    "You are a gardener who loves plants.",
    "You are a financial advisor. Be careful and practical.",
    "You are a doctor. Give general health information and remind people to see a professional.",
    "You are a programmer who explains things with code examples.",
    "You are a rude assistant who answers briefly and impatiently.",
    "You are a very shy assistant who is nervous about answering.",
    "You are an angry chef who yells about food.",
    "You are a surfer dude from California.",
    "You are a vampire who has lived for five hundred years.",
    "You are a game show host.",
    "You are a detective who solves mysteries with logic.",
]

FORMATS = [
    "Answer in one short paragraph.",
    "Use a bulleted list.",
    "Answer in exactly two sentences.",
    "Be very brief.",
    "Use simple words.",
    "Include an example.",
    "End your answer with a question.",
    "Use emojis.",
    "Write in a formal tone.",
    "Write in a casual tone.",
]

TOPICS = [
    "cats", "dogs", "the ocean", "volcanoes", "black holes", "the moon", "Mars", "dinosaurs", "bees",
    "coffee", "tea", "pizza", "chocolate", "bread", "sushi", "vegetables", "breakfast", "spicy food",
    "the Roman Empire", "ancient Egypt", "the French Revolution", "World War II", "the printing press",
    "the internet", "smartphones", "artificial intelligence", "robots", "computers", "video games",
    "Python programming", "JavaScript", "databases", "passwords", "email", "social media",
    "football", "basketball", "tennis", "the Olympics", "chess", "running", "yoga", "swimming",
    "jazz", "rock music", "classical music", "learning the guitar", "painting", "photography",
    "movies", "poetry", "novels", "theatre", "dancing", "fashion", "architecture",
    "rain", "snow", "thunderstorms", "climate change", "recycling", "forests", "deserts", "mountains",
    "Paris", "Japan", "New York", "Africa", "Australia", "Antarctica", "trains", "airplanes", "cars",
    "money", "saving money", "taxes", "starting a business", "job interviews", "working from home",
    "friendship", "love", "loneliness", "happiness", "anger", "fear", "sadness", "grief", "kindness",
    "sleep", "exercise", "healthy eating", "stress", "headaches", "the common cold", "vaccines",
    "mathematics", "prime numbers", "fractions", "geometry", "statistics", "gravity", "electricity",
    "magnets", "light", "sound", "atoms", "DNA", "evolution", "photosynthesis", "the human brain",
    "elections", "democracy", "the law", "human rights", "philosophy", "religion", "ethics",
    "birthdays", "weddings", "Christmas", "holidays", "camping", "fishing", "gardening", "cooking",
    "pirates", "ninjas", "wizards", "dragons", "ghosts", "aliens", "superheroes", "time travel",
    "the French language", "learning Spanish", "writing essays", "homework", "exams", "teachers",
    "babies", "grandparents", "pets", "neighbours", "roommates", "moving house", "cleaning",
]

CHARACTERS = [
    "a lonely robot", "a brave little mouse", "a retired pirate", "a clumsy wizard", "a talking dog",
    "a young astronaut", "a grumpy dragon", "a shy ghost", "a detective cat", "an old fisherman",
    "a princess who hates dresses", "a baker in Paris", "a time-travelling teacher", "a lost penguin",
]

EVENTS = [
    "finds a mysterious map", "loses their voice", "wins the lottery", "meets an alien",
    "gets stuck in an elevator", "learns to fly", "opens a restaurant", "forgets their birthday",
    "discovers a secret door", "has to save the town", "goes to school for the first time",
]

EMOTIONS = ["sad", "anxious", "angry", "bored", "excited", "lonely", "nervous", "happy", "stressed", "tired"]
REASONS = [
    "I failed an exam", "my friend moved away", "I start a new job tomorrow", "my cat is sick",
    "I have too much work", "it is raining all week", "I got a promotion", "I can't sleep",
    "my team lost the final", "I have a date tonight", "my computer broke", "I moved to a new city",
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "sums a list of numbers",
    "counts the vowels in a word", "finds the largest number in a list", "sorts a list of names",
    "converts Celsius to Fahrenheit", "reads a file and counts its lines", "computes a factorial",
    "removes duplicates from a list", "checks whether a word is a palindrome", "prints the Fibonacci numbers",
]

SENTENCES = [
    "Good morning, how are you?", "Where is the train station?", "I love reading books.",
    "The weather is beautiful today.", "Can I have a cup of coffee, please?", "My brother is a doctor.",
    "We are going to the beach tomorrow.", "Thank you very much for your help.", "I am hungry.",
]

TEMPLATES = [
    "Tell me a joke about {topic}.",
    "Tell me something funny about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "What are three interesting facts about {topic}?",
    "Write a short poem about {topic}.",
    "Write a haiku about {topic}.",
    "What do you think about {topic}?",
    "Give me some tips about {topic}.",
    "Why is {topic} important?",
    "What is the history of {topic}?",
    "Can you describe {topic} in a few sentences?",
    "I want to learn more about {topic}. Where should I start?",
    "What are the pros and cons of {topic}?",
    "Compare {topic} and {topic2}.",
    "Write a short story about {character} who {event}.",
    "Write a limerick about {topic}.",
    "What's a common misconception about {topic}?",
    "Write a product description for something related to {topic}.",
    "Give me a fun quiz question about {topic}.",
    "I'm feeling {emotion} because {reason}. What should I do?",
    "I'm {emotion} today. Can you cheer me up?",
    "Write a Python function that {code_task}.",
    "How would you explain {topic} using only simple words?",
    "Translate to French: {sentence}",
    "Translate to Spanish: {sentence}",
    "Make a list of five words related to {topic}.",
    "Write a tweet about {topic}.",
    "Write a short dialogue between two friends about {topic}.",
    "Pretend you are an expert on {topic}. What is the most surprising thing you know?",
    "What would happen if {topic} disappeared from the world?",
    "Write a motivational message about {topic}.",
    "Describe {topic} in the style of a pirate.",
    "Summarise the main ideas of {topic} in two sentences.",
    "Give me a recipe that reminds you of {topic}.",
    "What is 17 plus 25? Then tell me a fact about {topic}.",
    "Write a sad story about {topic}.",
    "Write a funny story about {topic}.",
    "Hi! Can you help me with a question about {topic}?",
    "Hello, how are you today?",
    "What is your favourite thing about {topic}?",
]


def read_docs(path: Path) -> list[str]:
    if not path.exists():
        raise SystemExit(f"error: {path} is missing; build the general-text corpus first "
                         f"(python3 tools/corpus/build_corpus.py --out {path.parent})")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def clip_words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def corpus_prompts(corpus: Path, rng: random.Random) -> dict[str, list[str]]:
    """User prompts built from the general-English corpus, by kind."""
    out: dict[str, list[str]] = {}
    openers = []
    for doc in read_docs(corpus / "chitchat.jsonl"):
        first = doc.split("\n", 1)[0]
        if first.startswith("A: ") and 15 <= len(first) <= 300:
            openers.append(first[3:])
    out["human-opener"] = openers
    questions = []
    for doc in read_docs(corpus / "chatterbot.jsonl"):
        first = doc.split("\n", 1)[0]
        if first.startswith("Q: "):
            questions.append(first[3:])
    out["chatterbot-question"] = sorted(set(questions))
    news = []
    for doc in read_docs(corpus / "bbc-news.jsonl"):
        ask = rng.choice(["Summarise this article in two sentences:", "What is this news story about?",
                          "Explain this news to me simply:", "Write a headline for this story:"])
        news.append(f"{ask}\n\n{clip_words(doc, 110)}")
    out["news-task"] = news
    jokes = []
    for doc in read_docs(corpus / "fortunes.jsonl") + read_docs(corpus / "popquotes.jsonl"):
        if len(doc) <= 400:
            ask = rng.choice(["What does this mean?", "Explain this joke:", "Is this funny? Why?",
                              "What do you think of this quote?"])
            jokes.append(f"{ask} \"{doc}\"")
    out["quote-task"] = jokes
    words = []
    for doc in read_docs(corpus / "wordnet.jsonl"):
        lemma = doc.split(" (", 1)[0].split(",")[0].replace("_", " ").strip()
        if lemma and len(lemma) < 30:
            words.append(rng.choice([f"What does the word \"{lemma}\" mean? Use it in a sentence.",
                                     f"Define \"{lemma}\".", f"Give me a synonym for \"{lemma}\"."]))
    out["word-task"] = sorted(set(words))
    return out


def template_prompt(rng: random.Random) -> str:
    topic, topic2 = rng.sample(TOPICS, 2)
    return rng.choice(TEMPLATES).format(
        topic=topic, topic2=topic2, character=rng.choice(CHARACTERS), event=rng.choice(EVENTS),
        emotion=rng.choice(EMOTIONS), reason=rng.choice(REASONS), code_task=rng.choice(CODE_TASKS),
        sentence=rng.choice(SENTENCES))


def system_prompt(rng: random.Random) -> str | None:
    r = rng.random()
    if r < 0.2:
        return None  # the chat template's own default system prompt
    persona = rng.choice(PERSONAS)
    if rng.random() < 0.3:
        persona += " " + rng.choice(FORMATS)
    return persona


# Shares of user-prompt kinds: templates cover topics and tasks evenly, corpus-drawn prompts
# bring real human phrasing and long inputs.
KIND_SHARES = [
    ("template", 0.45),
    ("human-opener", 0.17),
    ("chatterbot-question", 0.06),
    ("news-task", 0.12),
    ("quote-task", 0.12),
    ("word-task", 0.08),
]


def build(corpus: Path, count: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:chat-prompts")
    pools = corpus_prompts(corpus, random.Random(f"{seed}:corpus-prompts"))
    for pool in pools.values():
        rng.shuffle(pool)
    cursors = {kind: 0 for kind in pools}
    kinds, weights = zip(*KIND_SHARES)
    prompts = []
    for i in range(count):
        kind = rng.choices(kinds, weights)[0]
        if kind == "template":
            user = template_prompt(rng)
        else:
            pool = pools[kind]
            if not pool:
                kind, user = "template", template_prompt(rng)
            else:
                user = pool[cursors[kind] % len(pool)]
                cursors[kind] += 1
        prompts.append({"id": i, "system": system_prompt(rng), "user": user, "kind": kind})
    return prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help="the general-text corpus directory")
    p.add_argument("--out", type=Path, required=True, help="prompts file to write (JSONL)")
    p.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"prompts to write (default {DEFAULT_COUNT})")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    prompts = build(args.corpus, args.count, args.seed)
    tmp = args.out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps(prompt, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    by_kind: dict[str, int] = {}
    for prompt in prompts:
        by_kind[prompt["kind"]] = by_kind.get(prompt["kind"], 0) + 1
    print(f"wrote {args.out}: {len(prompts)} prompts, " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
