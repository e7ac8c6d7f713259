"""MixLoRA learns the quickstart task (ISO dates rewritten as DD/MM/YYYY) on the bundled
SmolLM2-135M-Instruct: trained in-process by `jft.train.fine_tune`, saved, loaded back
with `jft.load` and answering the held-out prompts greedily, at least 90% exactly right.

The cheapest settings measured to get there reliably on 2 CPU cores: 16 steps of batch 2
(packed rows of 96 tokens), learning rate 2e-3 with 2 warmup steps and cosine decay, LoRA
on all four attention projections, the paper's defaults otherwise (8 experts, top-2, r 8,
alpha 16). Measured there: 100% from step 12 on; with the paper's q/v-only attention LoRA
the same run ends near 90%, and a constant 3e-3 overshoots. No eval set during training
(the run would also evaluate before its first step): the adapter is scored once, after.
"""

from __future__ import annotations

import json
from pathlib import Path

import jft
from jft.train import fine_tune
from jft.training.data import exact_match

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples/quickstart"


def test_mixlora_learns_the_quickstart_task(tmp_path):
    run = fine_tune(None, [
        "model=smollm2-135m-instruct", "method.name=mixlora",
        "method.attention_targets=[q_proj,k_proj,v_proj,o_proj]",
        f"data.train={QUICKSTART / 'train.jsonl'}", "data.format=prompt_completion",
        "data.max_length=96", "data.packing=true",
        "train.steps=16", "train.batch_size=2", "train.learning_rate=2e-3",
        "train.warmup_steps=2", "train.schedule=cosine", f"output_dir={tmp_path / 'run'}",
    ])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.1 < records[0]["loss"]
    # The balance loss is logged; near k * coef = 0.002 while the routing stays balanced.
    assert 0.0 < records[-1]["mixlora/aux_loss"] < 0.01

    model = jft.load("smollm2-135m-instruct", adapter=run)
    assert [a.method for a in model.adapters] == ["mixlora"]
    examples = [json.loads(line) for line in (QUICKSTART / "eval.jsonl").read_text().splitlines()]
    answers = model.generate([e["prompt"] for e in examples], max_new_tokens=12)
    right = [exact_match(a, e["completion"]) for a, e in zip(answers, examples, strict=True)]
    assert sum(right) / len(right) >= 0.9, list(zip(answers, right, strict=True))
