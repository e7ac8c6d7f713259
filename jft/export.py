"""`python -m jft.export RUN_DIR --out DIR --format merged|peft|jft|gguf`: take a
fine-tuned model to transformers, vLLM, PEFT and llama.cpp / Ollama.

RUN_DIR is a `python -m jft.train` run directory (its latest checkpoint, over the model
its config names); or give `--model M --adapter DIR` for any adapter jft reads (a run
directory or a PEFT adapter directory). `merged` folds the deltas into the weights and
writes an HF model directory; `peft` writes `adapter_config.json` and
`adapter_model.safetensors`; `jft` writes jft's own adapter format, which every method has
(docs/formats.md); `gguf` writes the merged model as DIR/model.gguf. An existing --out is
moved aside only with --overwrite.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

from jft.errors import JftError, run_cli

FORMATS = ("merged", "peft", "jft", "gguf")
# What each format can express; the others have no equivalent there.
UNMERGEABLE = ("prompt_tuning", "prefix_tuning")  # virtual tokens are inputs, not weights


def build_parser():
    from jft.generate import ArgumentParser

    parser = ArgumentParser(prog="python -m jft.export",
                            description="Export a fine-tuned model (see docs/export.md).")
    parser.add_argument("run", nargs="?",
                        help="a jft.train run directory (its latest checkpoint), or one "
                        "checkpoint of it: RUN/checkpoints/N")
    parser.add_argument("--model", help="the base model (default: the run's config)")
    parser.add_argument("--adapter", help="an adapter instead of RUN: run dir or PEFT dir")
    parser.add_argument("--out", required=True, help="the directory to write (must not exist)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="merged weights' dtype (the merge itself runs in float32)")
    parser.add_argument("--quant", default="f16", choices=("f16", "q8_0", "f32"),
                        help="gguf weights' type (norms and biases stay f32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing --out aside (to OUT.oldN) instead of refusing")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if (args.run is None) == (args.adapter is None):
        raise JftError("give a run directory, or --model and --adapter (not both)")
    adapter = Path(args.run or args.adapter)
    model_name = args.model or _run_model(adapter)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise JftError(f"{out} exists; choose another --out, or pass --overwrite to move it "
                       "aside")
    import jft

    model = jft.load(model_name, dtype="float32", compute_dtype="float32", adapter=adapter)
    for a in model.adapters:
        _check_expressible(a.method, args.format)
    # Written beside --out and renamed at the end: a failed export leaves no half model.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    adapter = model.adapters[0] if model.adapters else None
    write_model(model, adapter, args.format, partial, str(model_name), args.dtype, args.quant)
    publish(partial, out)
    return 0


def write_model(model, adapter, format: str, directory: Path, base_name: str,
                dtype: str = "bf16", quant: str = "f16") -> None:
    """`model` (its adapters folded in) as an HF directory or a GGUF file, or `adapter`
    as a PEFT or jft adapter directory, written to `directory` (which must not exist)."""
    if format == "merged":
        from jft.formats.hf_export import write_hf_dir

        write_hf_dir(model, directory, dtype)
        return
    directory.mkdir(parents=True)
    if format == "gguf":
        from jft.formats.gguf_export import write_gguf_file
        from jft.formats.hf_export import merged_params

        write_gguf_file(model.config, merged_params(model), model.tokenizer,
                        directory / "model.gguf", quant)
    elif format == "peft":
        from jft.formats.bundled import HUB_IDS
        from jft.formats.peft_adapter import save_peft_adapter

        save_peft_adapter(adapter, model.config, directory, HUB_IDS.get(base_name, base_name))
    else:
        from jft.formats.jft_adapter import save_jft_adapter

        save_jft_adapter(adapter, model.config, directory, base_name)


def publish(partial: Path, out: Path) -> None:
    """The finished `partial` renamed to `out`, an existing `out` moved aside first."""
    if out.exists():
        from jft.training.outputs import free_name

        aside = free_name(out)
        shutil.move(str(out), aside)
        print(f"moved the existing {out} to {aside}", file=sys.stderr)
    partial.rename(out)
    print(f"wrote {out}", file=sys.stderr)


def _check_expressible(method: str, format: str) -> None:
    from jft.formats.peft_adapter import PEFT_METHODS

    mergeable = method not in UNMERGEABLE
    can = [f for f, ok in (("merged", mergeable), ("gguf", mergeable),
                           ("peft", method in PEFT_METHODS), ("jft", True)) if ok]
    if format not in can:
        raise JftError(f"--format {format} cannot express {method}; {method} exports as "
                       f"{' or '.join(can)}")


def _run_model(source: Path) -> str:
    """The base a run (its config.yaml) or a jft adapter (its jft_adapter.json) names."""
    from jft.formats.jft_adapter import CONFIG_FILE

    if source.parent.name == "checkpoints":  # RUN/checkpoints/N
        source = source.parents[1]
    for name, key in (("config.yaml", "model"), (CONFIG_FILE, "base_model")):
        if (source / name).is_file():
            try:
                value = yaml.safe_load((source / name).read_text())[key]
            except (yaml.YAMLError, KeyError, TypeError):
                value = None
            if value:
                return str(value)
    raise JftError(f"{source}: names no base model (no config.yaml 'model' or "
                   f"{CONFIG_FILE} 'base_model'); give --model")


if __name__ == "__main__":
    sys.exit(run_cli(main))
