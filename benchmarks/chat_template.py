"""What bounding chat templates costs: jft's render (Jinja's immutable sandbox plus the limits
of `jft.text.template_limits`) against Jinja's plain immutable sandbox on the same templates
and messages, side by side in one run.

    python benchmarks/chat_template.py [--repeats 2000] [--json PATH]

Templates: the bundled SmolLM2's (ChatML) and Gemma 3's, and a synthetic one that works the
bounded paths hard (filters, `~`, `%`, a macro, a namespace). Messages: a system prompt and
three user / assistant turns of about 300 characters each. Each render is timed alone
(`time.perf_counter_ns`), the two environments alternating, after 50 untimed warm-up renders;
the figures are medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

import jft
from jft.text import chat_template

WORKOUT = """{%- macro turn(m) -%}
<|{{ m['role'] | upper }}|>{{ m['content'] | trim }}{{ '\\n' ~ ('-' * 3) }}
{%- endmacro -%}
{%- set ns = namespace(count=0, names='') -%}
{%- for m in messages -%}
{%- set ns.count = ns.count + 1 -%}{%- set ns.names = ns.names ~ m['role'][:1] -%}
{{ turn(m) }}{{ '%s:%03d' % (m['role'], loop.index) }}{{ m['content'] | replace('a', 'A') }}
{%- endfor -%}
{{ ns.names | join(',') }}{{ messages | map(attribute='role') | list | tojson }}
{%- if add_generation_prompt %}<|ASSISTANT|>{% endif -%}
"""


def messages() -> list[dict]:
    text = ("Explain how the attention of a transformer layer mixes information between "
            "positions, and why the softmax scores are scaled by the square root of the head "
            "dimension. Give a short example with numbers. ")
    turns = [{"role": "system", "content": "You are a careful assistant. " * 4}]
    for index in range(3):
        turns.append({"role": "user", "content": f"Question {index}: {text}"})
        turns.append({"role": "assistant", "content": f"Answer {index}: {text[::-1]}"})
    return turns


def plain_environment() -> ImmutableSandboxedEnvironment:
    """What jft's environment is without the limits: the same options and globals."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
    environment.filters["tojson"] = chat_template._tojson
    environment.globals["raise_exception"] = chat_template._raise_exception
    environment.globals["namespace"] = jinja2.utils.Namespace
    return environment


def measure(template: str, repeats: int) -> dict:
    chat = messages()
    context = {"messages": chat, "add_generation_prompt": True, "bos_token": "<s>",
               "eos_token": "</s>", "tools": None, "documents": None}
    plain = plain_environment().from_string(template)

    def bounded() -> str:
        return chat_template.render(template, chat, add_generation_prompt=True,
                                    bos_token="<s>", eos_token="</s>")

    def unbounded() -> str:
        return plain.render(**context)

    assert bounded() == unbounded(), "the two environments render differently"
    for _ in range(50):
        bounded(), unbounded()
    times = {"jft": [], "plain": []}
    for _ in range(repeats):
        for name, render in (("jft", bounded), ("plain", unbounded)):
            start = time.perf_counter_ns()
            render()
            times[name].append(time.perf_counter_ns() - start)
    jft_us, plain_us = (statistics.median(times[k]) / 1e3 for k in ("jft", "plain"))
    return {"chars": len(bounded()), "jft_us": jft_us, "plain_us": plain_us,
            "ratio": jft_us / plain_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    templates = {
        "smollm2 (ChatML)": jft.load("smollm2-135m-instruct").tokenizer.chat_template,
        "gemma3": jft.load("gemma3-270m").tokenizer.chat_template,
        "workout (synthetic)": WORKOUT,
    }
    results = {name: measure(template, args.repeats) for name, template in templates.items()}
    print(f"{'template':<22}{'chars':>7}{'jft µs':>10}{'plain µs':>10}{'ratio':>8}")
    for name, row in results.items():
        print(f"{name:<22}{row['chars']:>7}{row['jft_us']:>10.1f}{row['plain_us']:>10.1f}"
              f"{row['ratio']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
            platform.machine(), "python": platform.python_version(),
            "jinja2": jinja2.__version__, "repeats": args.repeats, "results": results,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
