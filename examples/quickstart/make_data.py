"""Writes the quickstart's dataset: dates rewritten from ISO (2021-07-04) to 04/07/2021.

Procedurally generated from a fixed seed, so it is licence-clean and reproducible:
`python examples/quickstart/make_data.py` rewrites train.jsonl and eval.jsonl as shipped.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def example(rng: random.Random) -> dict:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 100))
    return {"prompt": f"Rewrite the date {day.isoformat()} as DD/MM/YYYY. Answer:",
            "completion": f" {day.strftime('%d/%m/%Y')}"}


def main():
    rng = random.Random(2024)
    for name, count in (("train", 512), ("eval", 32)):
        with open(HERE / f"{name}.jsonl", "w") as file:
            for _ in range(count):
                file.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    main()
