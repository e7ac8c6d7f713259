"""Writes the data-selection benchmark's pool: the quickstart task buried in noise and other tasks.

The target task is the quickstart's (examples/quickstart/): an ISO date rewritten as DD/MM/YYYY,

    Rewrite the date 2034-05-07 as DD/MM/YYYY. Answer:    -> 07/05/2034

pool.jsonl (prompt_completion format, shuffled) holds three kinds of record:

    clean     300  the target task, in the quickstart's exact prompt, with the right answer
    noisy     600  the same prompt, wrong answers, 100 of each kind: day and month swapped
                   (MM/DD/YYYY), YYYY/MM/DD, the ISO date copied unchanged, another date,
                   a digit or two dropped, the digits shuffled
    off_task 2400  eight other tasks, 300 each, in a similar " Answer:" style with short
                   completions and a few prompt wordings per task: a 24-hour time in 12-hour
                   form, a number in words, a word reversed, a sum, a word in capitals, the
                   initials of a phrase, one sentence of free text, and the US-style date
                   (ISO date as MM/DD/YYYY, answered correctly: a hard negative, close to the
                   target in wording but a different task)

pool_labels.jsonl has one line per pool record, in the same order, {"kind": ..., "task": ...};
only the benchmark reads it, to score what a selection method kept. target.jsonl holds 16
clean examples, the small target set that LESS and GOT-D score the pool against. Every date
used here is distinct, and none is a date in examples/quickstart/eval.jsonl, which stays the
held-out evaluation set; target dates are disjoint from pool dates.

Procedurally generated from a fixed seed, so it is licence-clean and reproducible:
`python examples/select/make_pool.py` rewrites pool.jsonl, pool_labels.jsonl and target.jsonl
as shipped.
"""

from __future__ import annotations

import datetime
import json
import random
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
QUICKSTART_EVAL = HERE.parent / "quickstart" / "eval.jsonl"
CLEAN, NOISY_EACH, OFF_TASK_EACH, TARGET = 300, 100, 300, 16

WORDS = (
    "apple", "river", "garden", "window", "candle", "forest", "pencil", "silver", "market",
    "bridge", "orange", "planet", "winter", "summer", "castle", "button", "rabbit", "kitchen",
    "mirror", "ladder", "butter", "pepper", "island", "valley", "meadow", "harbor", "lantern",
    "blanket", "thunder", "pillow", "jacket", "cotton", "basket", "carpet", "marble", "copper",
    "violet", "yellow", "purple", "shadow", "anchor", "rocket", "saddle", "turtle", "falcon",
    "dragon", "parrot", "monkey", "tomato", "potato", "cherry", "lemon", "melon", "honey",
    "bread", "cheese", "pasta", "coffee", "cookie", "cloud", "storm", "stone", "flower",
    "tiger", "horse", "mouse", "train", "plane", "chair", "table", "clock", "piano",
    "guitar", "violin", "camera", "letter", "ticket", "wallet", "bottle", "kettle", "bucket",
    "hammer", "needle", "thread", "feather", "pebble", "puzzle", "riddle", "circle", "square",
    "morning", "evening", "holiday", "journey", "picture", "library", "theater", "village",
    "station", "factory", "harvest", "compass", "blossom", "crystal", "diamond", "canyon",
    "glacier", "volcano", "desert", "ocean", "breeze", "sunset", "rainbow", "comet", "galaxy",
    "engine", "tunnel", "ribbon", "helmet", "pocket", "wizard", "knight", "sailor", "farmer",
    "doctor", "teacher", "painter", "baker", "singer", "dancer", "pilot", "author",
)

PHRASE_WORDS = (
    "national", "public", "open", "central", "global", "digital", "local", "united", "royal",
    "modern", "general", "simple", "random", "rapid", "secure", "shared", "remote", "virtual",
    "data", "network", "service", "system", "office", "energy", "health", "transport",
    "research", "science", "language", "memory", "access", "control", "market", "trade",
    "union", "council", "agency", "program", "protocol", "format", "device", "storage",
    "power", "water", "island", "river", "mountain", "city", "bank", "school", "museum",
)

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

# Free text: one short sentence, built from parts written for this file.
SUBJECTS = ("The old farmer", "A small child", "My neighbour", "The tired baker", "Our teacher",
            "The young pilot", "A quiet painter", "The ship's captain", "Her brother",
            "The village doctor", "A curious cat", "The night guard")
VERBS = ("carried", "painted", "found", "repaired", "sold", "watched", "cleaned", "borrowed",
         "described", "wrapped", "counted", "forgot")
OBJECTS = ("a wooden basket", "the blue kettle", "an old map", "three ripe pears",
           "a broken clock", "the heavy blanket", "a paper lantern", "the silver key",
           "a box of letters", "the garden gate", "a jar of honey", "two clay pots")
PLACES = ("near the harbour", "before sunrise", "in the busy market", "after the storm",
          "beside the river", "on a rainy afternoon", "at the edge of the forest",
          "during the long winter", "behind the station", "under the bright moon")
TOPICS = {"a farmer": "The old farmer", "a child": "A small child", "a baker": "The tired baker",
          "a teacher": "Our teacher", "a pilot": "The young pilot", "a painter": "A quiet painter",
          "a captain": "The ship's captain", "a doctor": "The village doctor",
          "a cat": "A curious cat", "a guard": "The night guard"}


def number_words(n: int) -> str:
    """0 <= n < 10000 in English words: 1305 -> one thousand three hundred five."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


def distinct_dates(rng: random.Random, count: int, exclude: set[datetime.date]):
    """`count` distinct dates between 1950 and 2049 (the quickstart's range), none in `exclude`."""
    days = rng.sample(range(365 * 100), count + len(exclude))
    dates = [datetime.date(1950, 1, 1) + datetime.timedelta(days=day) for day in days]
    return [day for day in dates if day not in exclude][:count]


def take(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def eval_dates() -> set[datetime.date]:
    dates = set()
    with open(QUICKSTART_EVAL) as file:
        for line in file:
            match = re.search(r"\d{4}-\d{2}-\d{2}", json.loads(line)["prompt"])
            dates.add(datetime.date.fromisoformat(match.group()))
    return dates


def on_task(day: datetime.date, answer: str) -> dict:
    """The quickstart's exact prompt, with `answer` as the completion."""
    return {"prompt": f"Rewrite the date {day.isoformat()} as DD/MM/YYYY. Answer:",
            "completion": f" {answer}"}


def drop_digits(rng: random.Random, text: str) -> str:
    chars = list(text)
    digits = [i for i, char in enumerate(chars) if char.isdigit()]
    for i in sorted(rng.sample(digits, rng.choice((1, 2))), reverse=True):
        del chars[i]
    return "".join(chars)


def shuffle_digits(rng: random.Random, text: str) -> str:
    digits = [char for char in text if char.isdigit()]
    rng.shuffle(digits)
    it = iter(digits)
    return "".join(next(it) if char.isdigit() else char for char in text)


NOISE = {  # task name: a wrong answer for the date (it may come out right: the caller redraws)
    "date_dmy_swapped": lambda rng, day: day.strftime("%m/%d/%Y"),
    "date_dmy_ymd": lambda rng, day: day.strftime("%Y/%m/%d"),
    "date_dmy_iso_copy": lambda rng, day: day.isoformat(),
    "date_dmy_other_date": lambda rng, day: (
        day + datetime.timedelta(days=rng.choice((-1, 1)) * rng.randrange(1, 3000))
    ).strftime("%d/%m/%Y"),
    "date_dmy_digits_dropped": lambda rng, day: drop_digits(rng, day.strftime("%d/%m/%Y")),
    "date_dmy_digits_shuffled": lambda rng, day: shuffle_digits(rng, day.strftime("%d/%m/%Y")),
}


def time_12h(rng: random.Random, _day) -> dict:
    hour, minute = rng.randrange(24), rng.randrange(60)
    clock = f"{hour:02d}:{minute:02d}"
    answer = f"{(hour - 1) % 12 + 1}:{minute:02d} {'AM' if hour < 12 else 'PM'}"
    prompt = rng.choice((
        f"Rewrite the time {clock} as H:MM AM/PM. Answer:",
        f"Convert the 24-hour time {clock} to 12-hour time. Answer:",
        f"What is {clock} in 12-hour format? Answer:",
    ))
    return {"prompt": prompt, "completion": f" {answer}"}


def number_to_words(rng: random.Random, _day) -> dict:
    n = rng.choice((rng.randrange(100), rng.randrange(1000), rng.randrange(10000)))
    prompt = rng.choice((
        f"Write the number {n} in words. Answer:",
        f"Spell out {n} in English words. Answer:",
        f"Rewrite the number {n} as words. Answer:",
    ))
    return {"prompt": prompt, "completion": f" {number_words(n)}"}


def reverse_word(rng: random.Random, _day) -> dict:
    word = rng.choice(WORDS)
    prompt = rng.choice((
        f"Reverse the word {word}. Answer:",
        f"Write the word '{word}' backwards. Answer:",
        f"Spell {word} in reverse order. Answer:",
    ))
    return {"prompt": prompt, "completion": f" {word[::-1]}"}


def add_numbers(rng: random.Random, _day) -> dict:
    a, b = rng.randrange(1000), rng.randrange(1000)
    prompt = rng.choice((
        f"What is {a} + {b}? Answer:",
        f"Add {a} and {b}. Answer:",
        f"Compute the sum of {a} and {b}. Answer:",
    ))
    return {"prompt": prompt, "completion": f" {a + b}"}


def uppercase_word(rng: random.Random, _day) -> dict:
    word = rng.choice(WORDS)
    prompt = rng.choice((
        f"Rewrite the word {word} in uppercase. Answer:",
        f"Write '{word}' in capital letters. Answer:",
        f"Convert {word} to upper case. Answer:",
    ))
    return {"prompt": prompt, "completion": f" {word.upper()}"}


def initials(rng: random.Random, _day) -> dict:
    phrase = " ".join(rng.sample(PHRASE_WORDS, rng.choice((2, 3, 3, 4))))
    prompt = rng.choice((
        f"Give the capital-letter initials of '{phrase}'. Answer:",
        f"What are the initials of the phrase {phrase}? Answer:",
        f"Abbreviate '{phrase}' to its initials in capitals. Answer:",
    ))
    return {"prompt": prompt, "completion": " " + "".join(w[0].upper() for w in phrase.split())}


def free_text(rng: random.Random, _day) -> dict:
    topic = rng.choice(sorted(TOPICS))
    subject, verb = TOPICS[topic], rng.choice(VERBS)
    thing, place = rng.choice(OBJECTS), rng.choice(PLACES)
    prompt, completion = rng.choice((
        (f"Write one short sentence about {topic}. Answer:", f"{subject} {verb} {thing} {place}."),
        (f"Finish the sentence: {subject} {verb} Answer:", f"{thing} {place}."),
        (f"Continue the story: {subject} {verb} {thing} Answer:", f"{place}."),
        (f"Say what {topic} did {place}. Answer:", f"{subject} {verb} {thing}."),
    ))
    return {"prompt": prompt, "completion": f" {completion}"}


def us_date(rng: random.Random, day: datetime.date) -> dict:
    iso = day.isoformat()
    prompt = rng.choice((
        f"Rewrite the date {iso} as MM/DD/YYYY. Answer:",
        f"Rewrite the date {iso} as MM/DD/YYYY. Answer:",
        f"Convert the date {iso} to MM/DD/YYYY. Answer:",
        f"Write {iso} as a US date (MM/DD/YYYY). Answer:",
    ))
    return {"prompt": prompt, "completion": f" {day.strftime('%m/%d/%Y')}"}


OFF_TASK = {  # task name: (record maker, whether it uses a date)
    "time_12h": (time_12h, False),
    "number_words": (number_to_words, False),
    "reverse_word": (reverse_word, False),
    "add_numbers": (add_numbers, False),
    "uppercase_word": (uppercase_word, False),
    "initials": (initials, False),
    "free_text": (free_text, False),
    "date_mdy": (us_date, True),
}


def main():
    rng = random.Random(2025)
    dated = CLEAN + NOISY_EACH * len(NOISE) + OFF_TASK_EACH + TARGET + 100  # spares for noise
    dates = iter(distinct_dates(rng, dated, exclude=eval_dates()))

    target = [on_task(day, day.strftime("%d/%m/%Y")) for day in take(dates, TARGET)]
    pool = [(on_task(day, day.strftime("%d/%m/%Y")), "clean", "date_dmy")
            for day in take(dates, CLEAN)]
    for task, wrong in NOISE.items():
        for _ in range(NOISY_EACH):
            day = next(dates)
            answer = wrong(rng, day)
            while answer == day.strftime("%d/%m/%Y"):  # a swap of 03/03, a shuffle back in place
                day = next(dates)  # another date, so the answer is wrong
                answer = wrong(rng, day)
            pool.append((on_task(day, answer), "noisy", task))
    seen = {json.dumps(record) for record, _, _ in pool}
    for task, (make, uses_date) in OFF_TASK.items():
        made = 0
        while made < OFF_TASK_EACH:
            record = make(rng, next(dates) if uses_date else None)
            if json.dumps(record) in seen:  # no exact duplicates
                continue
            seen.add(json.dumps(record))
            pool.append((record, "off_task", task))
            made += 1
    rng.shuffle(pool)

    with open(HERE / "target.jsonl", "w") as file:
        for record in target:
            file.write(json.dumps(record) + "\n")
    with open(HERE / "pool.jsonl", "w") as records, open(HERE / "pool_labels.jsonl", "w") as labels:
        for record, kind, task in pool:
            records.write(json.dumps(record) + "\n")
            labels.write(json.dumps({"kind": kind, "task": task}) + "\n")
    counts = Counter((kind, task) for _, kind, task in pool)
    print(f"pool.jsonl: {len(pool)} records; target.jsonl: {len(target)}")
    for (kind, task), count in sorted(counts.items()):
        print(f"  {kind:9} {task:25} {count}")


if __name__ == "__main__":
    main()
