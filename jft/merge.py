"""`python -m jft.merge --model M --inputs A B ... --method NAME --out DIR --format F`:
merge fine-tunes of one base (docs/merging.md).

Inputs are `jft.train` run directories, jft adapters, PEFT adapters or merged HF
directories of the base. Task-vector methods write the merged weights (`merged`, `gguf`)
or a `full` adapter of the changed weights (`jft`); `cat` and `svd` of LoRA inputs write
one LoRA (`jft`, `peft`, or merged). `--method compress` (ComPEFT) writes one input's
task vector sparsified and ternarised. Every output records its recipe in
merge_recipe.json. An existing --out is moved aside only with --overwrite.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

from jft.errors import JftError, run_cli
from jft.export import publish, write_model
from jft.storage import check_creatable, writing

FORMATS = ("jft", "peft", "merged", "gguf")
RECIPE_FILE = "merge_recipe.json"


def build_parser():
    from jft.generate import ArgumentParser
    from jft.merging.api import METHODS

    parser = ArgumentParser(prog="python -m jft.merge",
                            description="Merge fine-tunes of one base (docs/merging.md).")
    parser.add_argument("--model", required=True, help="the base: bundled name, HF dir, .gguf")
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="run dirs, jft or PEFT adapters, merged HF dirs of the base")
    parser.add_argument("--method", required=True, choices=(*METHODS, "compress"))
    parser.add_argument("--weights", nargs="+", type=float,
                        help="one per input (default 1 each); negative negates a task")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="λ: θ = θ0 + λ·τ_merged (default: %(default)s)")
    parser.add_argument("--density", type=float, default=None,
                        help="fraction kept by ties, dare_*, magnitude_prune, breadcrumbs*, "
                        "della*, compress (default: 1.0; compress: ComPEFT's 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="dare_* and della* masks")
    parser.add_argument("--majority-sign", default="total", choices=("total", "frequency"))
    parser.add_argument("--gamma", type=float, default=0.01,
                        help="breadcrumbs: the fraction of largest magnitudes dropped")
    parser.add_argument("--epsilon", type=float, default=0.15,
                        help="della: the spread of keep probabilities around density")
    parser.add_argument("--lines-alpha", type=float, help="LiNeS α (default: see docs)")
    parser.add_argument("--lines-beta", type=float, help="LiNeS β (default: see docs)")
    parser.add_argument("--svd-rank", type=int, help="svd: the merged rank (default: the "
                        "largest input rank)")
    parser.add_argument("--eval", help="compress: a JSONL file to report the held-out loss "
                        "before and after compression on")
    parser.add_argument("--eval-format", default="prompt_completion",
                        choices=("prompt_completion", "chat", "text"))
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="merged weights' dtype (the merge runs in float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing --out aside (to OUT.oldN) instead of refusing")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise JftError(f"{out} exists; choose another --out, or pass --overwrite to move it "
                       "aside")
    partial = out.with_name(out.name + ".partial")  # renamed at the end: no half output
    check_creatable(partial if out.exists() else out, "--out")  # before the model loads
    import jft

    model = jft.load(args.model, dtype="float32", compute_dtype="float32")
    shutil.rmtree(partial, ignore_errors=True)  # a killed merge's leftovers
    with writing(out, partial=partial):
        if args.method == "compress":
            recipe = _compress(args, model, partial)
        else:
            from jft.merging.api import merge

            result = merge(model, args.inputs, args.method, args.weights,
                           density=1.0 if args.density is None else args.density,
                           seed=args.seed, majority_sign=args.majority_sign, gamma=args.gamma,
                           epsilon=args.epsilon, scale=args.scale,
                           lines_alpha=args.lines_alpha, lines_beta=args.lines_beta,
                           svd_rank=args.svd_rank)
            _write(result, args, partial)
            recipe = result.recipe
        recipe |= {"base_model": args.model, "format": args.format}
        (partial / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    publish(partial, out)
    return 0


def _write(result, args, directory: Path) -> None:
    from jft.api import Model

    model = result.model
    if result.adapter is not None:  # one LoRA over the unchanged base
        merged = Model(model.config, model.params, model.tokenizer, model.source,
                       [result.adapter])
        write_model(merged, result.adapter, args.format, directory, args.model, args.dtype)
        return
    if args.format == "peft":
        raise JftError(f"--format peft cannot express a {args.method} merge (merged weights, "
                       "not one LoRA); use --format jft, merged or gguf, or --method cat/svd "
                       "of LoRA inputs")
    merged = Model(model.config, result.params, model.tokenizer, model.source, [])
    adapter = _changed_weights(result, model.config) if args.format == "jft" else None
    write_model(merged, adapter, args.format, directory, args.model, args.dtype)


def _changed_weights(result, model):
    """The merge as an adapter over the base: a `sparse_delta` of the changed entries where
    the merged task vector is sparse (sums of SpIEL or S²FT deltas, trimmed merges), else
    a `full` adapter holding exactly the weights it changed."""
    from jft.peft import Adapter
    from jft.peft.full import FullConfig, select
    from jft.peft.sparse_delta import SparseDeltaConfig, from_task_vector

    sparse = from_task_vector(result.vector, model)
    if sparse is not None:
        config = SparseDeltaConfig(targets=tuple(sorted(sparse["layers"])))
        return Adapter(sparse, "sparse_delta", config)
    names = tuple(sorted({key[-1] for key in result.vector}))
    config = FullConfig(params=names)
    return Adapter(select(result.params, config), "full", config)


def _compress(args, model, directory: Path) -> dict:
    """ComPEFT of one input: its task vector's top `density` entries per tensor, each
    ternarised to sign × scale_multiplier·std; with --eval, the held-out loss of the
    model with the task vector before and after."""
    from jft.merging.compress import (
        COMPRESSED_FILE,
        DEFAULT_DENSITY,
        compressed_bytes,
        decompress,
        save_compressed,
    )
    from jft.merging.task_vectors import apply_task_vector, read_input, task_vector

    if len(args.inputs) != 1:
        raise JftError(f"--inputs: --method compress takes one input, got {len(args.inputs)}")
    if args.format != "jft":
        raise JftError("--format: --method compress writes jft's compressed task vector; use "
                       "--format jft (merge it later with --method linear --inputs OUT)")
    density = DEFAULT_DENSITY if args.density is None else args.density
    if not 0.0 < density <= 1.0:
        raise JftError(f"--density must be in (0, 1], got {density}")
    item = read_input(args.inputs[0], model.params, model.config)
    vector = task_vector(item, model.params, model.config)
    directory.mkdir(parents=True)
    compressed = save_compressed(directory / COMPRESSED_FILE,
                                 {"/".join(key): value for key, value in vector.items()},
                                 density=density, scale_multiplier=args.scale)
    report = {"dense_bytes": int(sum(v.size * 4 for v in vector.values())),
              "compressed_bytes": compressed_bytes(compressed)}
    if args.eval:
        restored = {tuple(name.split("/")): decompress(c) for name, c in compressed.items()}
        report["eval_loss_before"] = _held_out(model, apply_task_vector(model.params, vector),
                                               args.eval, args.eval_format)
        report["eval_loss_after"] = _held_out(model, apply_task_vector(model.params, restored),
                                              args.eval, args.eval_format)
    print(json.dumps(report), flush=True)
    return {"method": "compress", "inputs": [{"path": str(item.path), "sha256": item.digest}],
            "density": density, "scale_multiplier": args.scale, **report}


def _held_out(model, params, path: str, data_format: str) -> float:
    """Mean target-token loss over a data file (`--eval-format`)."""
    import jax

    from jft.objectives.sft import SFT
    from jft.training.data import DataConfig, read_split
    from jft.training.data import batcher as make_batches

    data = DataConfig(train=path, format=data_format, max_length=512)
    _, tokens = read_split(data, model.tokenizer)
    step = jax.jit(lambda p, b: SFT.held_out(model.config, p, (), b))
    total = count = 0.0
    for batch in make_batches(tokens, data, model.tokenizer, 8, split="eval"):
        loss, targets, _ = step(params, batch)
        total, count = total + float(loss), count + int(targets)
    return total / max(count, 1)


class _CallableModule(types.ModuleType):
    """`jft.merge(...)` is the Python API (`jft.merging.api.merge`), and importing this
    module (the CLI) rebinds the package's `merge` attribute to it: calling the module
    keeps `jft.merge(...)` working either way."""

    def __call__(self, *args, **kwargs):
        from jft.merging.api import merge

        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(run_cli(main))
