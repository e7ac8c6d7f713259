"""Writes the continual-learning benchmark's data: four date-rewriting tasks that interfere.

Every task reads the same kind of input, an ISO date (2034-05-07), and writes it in a
different format, named in its prompt:

    date_dmy      Rewrite the date 2034-05-07 as DD/MM/YYYY. Answer:    -> 07/05/2034
    date_mdy      Rewrite the date 2034-05-07 as MM/DD/YYYY. Answer:    -> 05/07/2034
    date_words    Rewrite the date 2034-05-07 as Month D, YYYY. Answer: -> May 7, 2034
    date_compact  Rewrite the date 2034-05-07 as YYYYMMDD. Answer:      -> 20340507

Trained one after another, each task pulls the model towards its own format, so a model
that learns the next one forgets the last (DD/MM and MM/DD even share every character).
Each task has train.jsonl (200 examples) and eval.jsonl (24, dates disjoint from its
train dates) in the prompt_completion format. general.jsonl (text format) holds short
general-knowledge paragraphs, written for this file, to measure general-ability
perplexity and to replay.

Procedurally generated from a fixed seed, so it is licence-clean and reproducible:
`python examples/continual/make_tasks.py` rewrites every file as shipped.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TRAIN, EVAL = 200, 24

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")

TASKS = {  # name: (the format as the prompt names it, the date written in it)
    "date_dmy": ("DD/MM/YYYY", lambda day: day.strftime("%d/%m/%Y")),
    "date_mdy": ("MM/DD/YYYY", lambda day: day.strftime("%m/%d/%Y")),
    "date_words": ("Month D, YYYY", lambda day: f"{MONTHS[day.month - 1]} {day.day}, {day.year}"),
    "date_compact": ("YYYYMMDD", lambda day: day.strftime("%Y%m%d")),
}

GENERAL = [
    "Water boils at a lower temperature on a mountain than at sea level. The air pressure "
    "is lower at altitude, so the molecules escape the liquid more easily. This is why "
    "pasta takes longer to cook in high mountain towns.",
    "The Nile flows north through eastern Africa and empties into the Mediterranean Sea. "
    "For thousands of years its yearly floods left rich soil along its banks. Farmers in "
    "ancient Egypt planned their whole calendar around the rising river.",
    "Bread rises because yeast feeds on sugars in the dough and releases carbon dioxide. "
    "The gas is trapped by a stretchy network of gluten. Baking then sets the structure "
    "and gives the crust its brown colour.",
    "The printing press with movable type spread across Europe in the fifteenth century. "
    "Books became cheaper and far more common than handwritten copies. Ideas could now "
    "travel quickly between cities and universities.",
    "Plants make their food through photosynthesis. Their leaves capture sunlight and use "
    "its energy to turn water and carbon dioxide into sugar. Oxygen is released as a "
    "by-product, which animals need to breathe.",
    "Iceland sits on the boundary between two tectonic plates. The island has many "
    "volcanoes, hot springs and geysers. Much of its electricity and heating comes from "
    "the heat stored underground.",
    "A good soup often starts with onions, carrots and celery cooked slowly in a little "
    "oil. This base adds sweetness and depth to the broth. Herbs are usually added near "
    "the end so their flavour stays fresh.",
    "The Roman Empire built roads that stretched across much of Europe. They were made "
    "of layered stone and gravel, with a curved surface so rain would drain away. Some "
    "of these roads are still used today.",
    "The heart is a muscle that pumps blood through the body without rest. Blood carries "
    "oxygen from the lungs to every organ. An adult heart beats roughly seventy times "
    "each minute while the body is at rest.",
    "The Sahara is the largest hot desert in the world. Only a small part of it is "
    "covered by sand dunes; much of it is rock and gravel. Temperatures can fall sharply "
    "at night because dry air holds little heat.",
    "Rice is the main food for more than half of the people on Earth. It grows best in "
    "warm, wet fields that are often flooded on purpose. The water keeps many weeds from "
    "growing around the young plants.",
    "The first successful powered airplane flight took place in 1903. It lasted only "
    "twelve seconds and covered a short distance. Within a few decades, aircraft were "
    "carrying passengers across oceans.",
    "Light travels faster than anything else we know. It takes about eight minutes for "
    "sunlight to reach the Earth. When we look at distant stars, we see light that left "
    "them long ago.",
    "Mount Everest is the highest mountain above sea level. It lies on the border between "
    "Nepal and China. Climbers usually carry extra oxygen because the air near the summit "
    "is very thin.",
    "To make a simple salad dressing, whisk three parts oil with one part vinegar. A pinch "
    "of salt and a little mustard help the two mix together. Taste it and adjust the "
    "balance before pouring it over the leaves.",
    "The Great Wall of China was built and rebuilt over many centuries. It was meant to "
    "protect northern borders from raids. Its many sections together run for thousands "
    "of kilometres across hills and deserts.",
    "Bees collect nectar from flowers and turn it into honey inside the hive. While they "
    "feed, they carry pollen from one flower to another. This helps many fruits and "
    "vegetables to grow.",
    "Canada has more lakes than any other country. Many of them were carved out by "
    "glaciers during the last ice age. In winter, some lakes freeze so thick that trucks "
    "can drive across them.",
    "Eggs change when they are heated because their proteins unfold and bond together. "
    "A soft-boiled egg needs only a few minutes in boiling water. Cooling the egg in cold "
    "water afterwards makes it easier to peel.",
    "The steam engine changed how goods were made and moved in the eighteenth and "
    "nineteenth centuries. Factories no longer had to be built beside rivers to use water "
    "power. Railways soon linked towns that had been days apart.",
    "Sound is a wave that moves through air, water or solid objects. It cannot travel "
    "through empty space. This is why astronauts use radios to talk to each other outside "
    "their spacecraft.",
    "The Amazon rainforest covers a large part of South America. It is home to a huge "
    "variety of plants, insects, birds and mammals. Its trees also store great amounts "
    "of carbon.",
    "Tea is made by pouring hot water over the dried leaves of the tea plant. Green tea "
    "and black tea come from the same plant but are processed differently. Black tea "
    "leaves are allowed to oxidise before they are dried.",
    "Ancient Greek cities often held public meetings where citizens debated new laws. "
    "In Athens, many decisions were made by a vote of the assembly. Only some residents, "
    "however, were allowed to take part.",
    "The Moon has no light of its own. It shines because it reflects light from the Sun. "
    "Its shape seems to change through the month as we see more or less of its sunlit "
    "side.",
    "Australia is both a country and a continent. Most of its people live near the coast, "
    "while the dry interior is thinly settled. Kangaroos and koalas are found nowhere else "
    "in the wild.",
    "Roasting vegetables at a high temperature brings out their natural sugars. The edges "
    "turn brown and slightly crisp. Cutting the pieces to a similar size helps them cook "
    "evenly.",
    "The telephone allowed people to speak to each other across long distances for the "
    "first time. Early calls had to be connected by hand at a switchboard. Today most "
    "calls travel as digital signals.",
    "Rainbows appear when sunlight passes through drops of water in the air. Each drop "
    "bends the light and splits it into its colours. You can only see a rainbow when the "
    "Sun is behind you.",
    "The Alps form a long chain of mountains across central Europe. Their snow feeds "
    "several major rivers, including the Rhine and the Rhone. Many valleys are known for "
    "farming, cheese and winter sports.",
    "Cheese is made by curdling milk and separating the solid curds from the liquid whey. "
    "The curds are pressed, salted and often left to age. Aging allows the flavour to "
    "grow stronger over weeks or years.",
    "Paper was first made in China about two thousand years ago. The method slowly "
    "spread along trade routes to the Middle East and then to Europe. Before paper, "
    "people wrote on materials such as bamboo, silk and animal skin.",
    "Magnets have two ends, called the north and south poles. Opposite poles pull toward "
    "each other, while matching poles push apart. A compass needle is a small magnet "
    "that lines up with the Earth's magnetic field.",
    "Japan is made up of thousands of islands, though four of them are much larger than "
    "the rest. The country has many mountains and active volcanoes. Its trains are known "
    "for being fast and on time.",
    "Many kinds of pasta are made from just flour, water and sometimes eggs. The dough is "
    "rolled thin and cut into shapes. Fresh pasta cooks in a few minutes, while dried "
    "pasta takes longer.",
    "The Renaissance was a period of new interest in art, science and learning in Europe. "
    "Painters studied light, shadow and the human body with great care. Many famous works "
    "of that time are still admired in museums.",
    "The human skeleton has more than two hundred bones. They support the body, protect "
    "the organs and work with muscles to create movement. Bones are living tissue that "
    "can repair themselves after a break.",
    "The Pacific is the largest and deepest ocean on the planet. It is surrounded by a "
    "ring of volcanoes and frequent earthquakes. Thousands of islands are scattered "
    "across its waters.",
    "Slow cooking turns tough cuts of meat tender. Over several hours, the tissue that "
    "holds the fibres together breaks down. A little liquid in the pot keeps the meat "
    "from drying out.",
    "Explorers in the fifteenth and sixteenth centuries sailed across oceans to find new "
    "trade routes. Their voyages connected distant parts of the world. They also brought "
    "new foods, such as potatoes and tomatoes, to Europe.",
    "Clouds form when warm, moist air rises and cools. The water vapour condenses into "
    "tiny droplets around specks of dust. When the droplets grow heavy enough, they fall "
    "as rain or snow.",
    "The Mississippi River drains a large part of the United States. Boats have carried "
    "goods along it for centuries. Its delta in the south is home to wetlands full of "
    "birds and fish.",
    "Chocolate comes from the seeds of the cacao tree. The seeds are fermented, dried and "
    "roasted before they are ground into a paste. Sugar and milk are added to make the "
    "sweet chocolate many people enjoy.",
    "The invention of the light bulb changed daily life in homes and cities. People could "
    "work and read long after sunset. Streets also became safer once they were lit at "
    "night.",
    "Earthquakes happen when large blocks of rock suddenly slip past each other. The "
    "energy travels through the ground as waves. Buildings in risky areas are often "
    "designed to bend rather than break.",
    "Norway has a long coastline cut by deep, narrow inlets called fjords. They were "
    "shaped by glaciers that carved the valleys and were later filled by the sea. Small "
    "villages sit along their steep sides.",
    "Herbs such as basil, parsley and mint are easy to grow in small pots. They need "
    "sunlight, regular water and soil that drains well. Picking the leaves often helps "
    "the plants grow fuller.",
    "Libraries have collected and shared books for thousands of years. Some ancient "
    "libraries held scrolls on many subjects, from medicine to poetry. Today many "
    "libraries also lend films, music and digital books.",
]


def dates(rng: random.Random, count: int) -> list[datetime.date]:
    """`count` distinct dates between 1950 and 2049, in random order."""
    days = rng.sample(range(365 * 100), count)
    return [datetime.date(1950, 1, 1) + datetime.timedelta(days=day) for day in days]


def example(name: str, day: datetime.date) -> dict:
    spec, write = TASKS[name]
    return {"prompt": f"Rewrite the date {day.isoformat()} as {spec}. Answer:",
            "completion": f" {write(day)}"}


def write_jsonl(path: Path, records: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def main():
    rng = random.Random(2025)
    for name in TASKS:
        days = dates(rng, TRAIN + EVAL)  # distinct, so eval dates never appear in train
        write_jsonl(HERE / name / "train.jsonl", [example(name, day) for day in days[:TRAIN]])
        write_jsonl(HERE / name / "eval.jsonl", [example(name, day) for day in days[TRAIN:]])
    write_jsonl(HERE / "general.jsonl", [{"text": text} for text in GENERAL])


if __name__ == "__main__":
    main()
