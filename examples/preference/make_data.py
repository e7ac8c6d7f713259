"""Writes a small preference set: arithmetic questions, each answered in the wanted form
(the bare number) and an unwanted one (a sentence around the same number).

Procedurally generated from a fixed seed, so it is licence-clean and reproducible:
`python examples/preference/make_data.py` rewrites train.jsonl and eval.jsonl as shipped.
Records use the chat form of `data.format: preference`: the prompt is a list of messages,
chosen and rejected are the assistant's replies.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDY = ("The answer is {}.", "Sure! {} + {} equals {}.", "Let me add them: the sum is {}.",
         "Adding {} and {} gives {}.")


def example(rng: random.Random) -> dict:
    a, b = rng.randrange(2, 100), rng.randrange(2, 100)
    wordy = rng.choice(WORDY)
    rejected = wordy.format(a + b) if wordy.count("{}") == 1 else wordy.format(a, b, a + b)
    return {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def main():
    rng = random.Random(2026)
    for name, count in (("train", 256), ("eval", 32)):
        with open(HERE / f"{name}.jsonl", "w") as file:
            for _ in range(count):
                file.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    main()
