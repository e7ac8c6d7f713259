#!/usr/bin/env bash
# The GPU half of the jft vs transformers + PEFT benchmark (benchmarks/vs_peft.py), in
# parts that each fit a 10-minute command:
#
#     bash benchmarks/gpu_suite.sh OUTDIR PART     # PART: 1 .. 11, all, or list
#
# Run from anywhere in the checkout, on a machine with one GPU (bf16 by default there)
# and JAX (CUDA), torch, transformers and peft installed; nothing is downloaded. Each
# part installs this checkout if `import jft.models` fails (editable, no dependencies:
# the benchmark needs only numpy, ml_dtypes and optax of jft's), prints the versions and
# nvidia-smi, and runs its cases with vs_peft.py --deadline, so that it stops in time
# even where the estimates below are wrong (cases not started are recorded as "not
# run"; run the part again for them). It writes into OUTDIR, named by device, date and
# part (N: 1, 2, ... or 6a, 6b, ... where a part makes two calls):
#     vs_peft_<device>_<date>_part<N>.json   the records
#     vs_peft_<device>_<date>_part<N>.png    their chart
#     vs_peft_<device>_<date>_part<N>.log    what vs_peft.py printed
# and prints the versions first. Charts of several parts together:
#     python benchmarks/plot_vs_peft.py OUTDIR/*part[1267]*.json --out chart.png
#
# Parts, most telling first, with estimated minutes on an H100 (per case, start to
# record: jft ~0.5-1.5, its compile dominating; PyTorch eager ~0.5-1; torch.compile
# ~2-3, compiling forward and backward of every layer; unmeasured, hence --deadline):
#   1  llama-1b, batch 4 x 2048: every method, jft and torch                        ~7
#   2  llama-8b, batch 1 x 2048: lora, dora, full, jft and torch                    ~7
#      (full FT of 8B needs ~16 bytes per parameter in weights, gradients and AdamW
#      state, about 128 GB: expected out of memory on both sides, recorded as such)
#   3  llama-8b LoRA, batch 1, seq 512 1024 2048 4096 8192: jft and torch           ~8
#   4  llama-8b LoRA, batch 1: --find-max-seq for jft (from 8192, to 1024 tokens)   ~8
#   5  llama-8b LoRA, batch 1: --find-max-seq for torch (from 8192, to 1024 tokens) ~8
#   6  torch.compile: llama-1b lora (batch 4), llama-8b lora (batch 1), x 2048      ~6
#   7  llama-8b s2ft, spiel, lisa (jft); smollm2-135m, batch 8 x 2048: full, lora,
#      dora (jft and torch)                                                         ~8
#   8  smollm2-135m s2ft, spiel, lisa (jft); torch.compile: smollm2-135m full,
#      lora, dora                                                                   ~8
#   9  torch.compile: llama-1b full, dora; llama-8b dora                            ~8
#  10  torch.compile: llama-8b LoRA, seq 512 1024 2048 4096 8192                    ~9
#  11  the Pallas kernels: the GPU-only kernel tests, then
#      benchmarks/kernels.py at Llama-3-8B shapes (kernels_<device>_<date>.json)    ~6
set -euo pipefail

usage="usage: bash benchmarks/gpu_suite.sh OUTDIR PART   (PART: 1..11, all, list)"
if [[ $# -ne 2 ]]; then
    echo "error: $usage" >&2
    exit 2
fi
outdir=$(mkdir -p "$1" && cd "$1" && pwd)
part=$2
if [[ $part == list ]]; then
    sed -n '/^# Parts,/,/^set -euo/p' "$0" | sed '$d'
    exit 0
fi
if [[ $part != all && ! $part =~ ^([1-9]|10|11)$ ]]; then
    echo "error: PART must be 1..11, all or list, got '$part'; $usage" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# 8.5 minutes per part leave room for the install, the versions and the charts.
deadline=${DEADLINE:-510}

if ! "$python" -c "import jft.models" 2>/dev/null; then
    # pyproject maps jft.models to models/ (and sharding/, pallas_kernels/ likewise), so
    # PYTHONPATH=. cannot import it: install the checkout, editable.
    "$python" -m pip install -q -e . --no-deps --no-build-isolation
fi

device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
    | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//' \
    || true)
device=${device:-nogpu}
stamp=$(date -u +%Y-%m-%d)

versions() {
    "$python" -c '
import importlib.metadata as m, platform
names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "torch", "transformers",
         "peft", "triton")
found = []
for name in names:
    try:
        found.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        pass
print(f"python {platform.python_version()}; " + ", ".join(found))'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    echo "jft checkout: $(git describe --always --dirty 2>/dev/null || echo unknown)"
}

# One vs_peft.py call of the part, NAME its files' suffix; the calls of a part share its
# deadline.
run() {
    local name="$outdir/vs_peft_${device}_${stamp}_part$1"
    shift
    local left=$((deadline - ($(date +%s) - part_start)))
    if ((left < 30)); then
        echo "== $name: not run, the part's $deadline s are spent"
        return
    fi
    "$python" benchmarks/vs_peft.py --json "$name.json" --overwrite --deadline "$left" "$@" \
        2>&1 | tee "$name.log"
    "$python" benchmarks/plot_vs_peft.py "$name.json" --out "$name.png"
}

lora8b=(--shape llama-8b --method lora --batch 1)
sweep=(--seq 512 1024 2048 4096 8192)
search=(--find-max-seq --seq 8192 --seq-resolution 1024 --case-timeout 240)
for n in 1 2 3 4 5 6 7 8 9 10 11; do
    if [[ $part != all && $part != "$n" ]]; then
        continue
    fi
    part_start=$(date +%s)
    echo "== part $n on $device, $(date -u +%FT%TZ)"
    versions
    case $n in
        1) run 1 --shape llama-1b --method full lora dora s2ft spiel lisa \
               --framework jft torch --batch 4 --seq 2048 ;;
        2) run 2 --shape llama-8b --method lora dora full --framework jft torch \
               --batch 1 --seq 2048 ;;
        3) run 3 "${lora8b[@]}" --framework jft torch "${sweep[@]}" ;;
        4) run 4 "${lora8b[@]}" --framework jft "${search[@]}" ;;
        5) run 5 "${lora8b[@]}" --framework torch "${search[@]}" ;;
        6) run 6a --shape llama-1b --method lora --framework torch.compile --batch 4 --seq 2048
           run 6b "${lora8b[@]}" --framework torch.compile --seq 2048 ;;
        7) run 7a --shape llama-8b --method s2ft spiel lisa --framework jft \
               --batch 1 --seq 2048
           run 7b --shape smollm2-135m --method full lora dora --framework jft torch \
               --batch 8 --seq 2048 ;;
        8) run 8a --shape smollm2-135m --method s2ft spiel lisa --framework jft \
               --batch 8 --seq 2048
           run 8b --shape smollm2-135m --method full lora dora --framework torch.compile \
               --batch 8 --seq 2048 ;;
        9) run 9a --shape llama-1b --method full dora --framework torch.compile \
               --batch 4 --seq 2048
           run 9b --shape llama-8b --method dora --framework torch.compile \
               --batch 1 --seq 2048 ;;
        10) run 10 "${lora8b[@]}" --framework torch.compile "${sweep[@]}" ;;
        11) # The compiled Triton kernels against their references, then their speed.
            "$python" -m pytest -q -o addopts="" tests/test_kernels_lora.py \
                tests/test_kernels_s2ft.py tests/test_kernels_multi_lora.py -k gpu \
                2>&1 | tee "$outdir/kernels_${device}_${stamp}_tests.log" || true
            "$python" benchmarks/kernels.py --overwrite \
                --json "$outdir/kernels_${device}_${stamp}.json" \
                2>&1 | tee "$outdir/kernels_${device}_${stamp}.log" ;;
    esac
done
