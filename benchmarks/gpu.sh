#!/usr/bin/env bash
# The whole GPU picture in one command: the CUDA tests, the UNet-step benchmark matrix (eager and
# compiled) and whole 50-step generations, all with random weights (nothing is downloaded).
#
#   bash benchmarks/gpu.sh              run everything (takes a while: see README, "GPU")
#   bash benchmarks/gpu.sh --dry-run    check the environment and print every command, run nothing
#
# Needs: a CUDA build of torch with a visible GPU, this checkout installed with its benchmark and test
# dependencies (pip install -e '.[bench,dev]'). Writes to benchmarks/results/gpu-<device name>/:
#   env.txt          GPU, driver, CUDA, torch/diffusers/... versions, git commit
#   test_cuda.txt    pytest output of tests/test_cuda.py
#   bench-<arch>/    agentsd bench tables (results.md, results.csv, speedup.png) per architecture
#   generation-*/    bench_generation.py tables (generation.md, generation.csv)
#   runs.md          every command with its exit status
# Each step runs even if an earlier one failed; the exit status is 1 if any failed.

set -uo pipefail

usage() {
    cat <<'EOF'
usage: bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--overwrite] [--only PART]...

  --dry-run    check the environment and print every command; run and write nothing
  --out DIR    results folder (default: benchmarks/results/gpu-<device name>)
  --overwrite  replace results already in the folder (default: refuse to start)
  --only PART  run only this part: tests, bench or generation (repeatable)
Environment: PYTHON (default: python) is the interpreter with a CUDA torch and agentsd installed.
EOF
}

DRY=0 OVERWRITE=0 OUT="" ONLY=()
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --overwrite) OVERWRITE=1 ;;
        --out)
            [[ $# -ge 2 ]] || { echo "gpu.sh: error: --out needs a folder" >&2; exit 2; }
            OUT=$2; shift ;;
        --only)
            [[ $# -ge 2 && $2 =~ ^(tests|bench|generation)$ ]] || {
                echo "gpu.sh: error: --only takes tests, bench or generation" >&2; exit 2; }
            ONLY+=("$2"); shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Everything runs from the repository root, so `python -m agentsd` and the tests use this checkout;
# a relative --out stays relative to where the script was started.
[[ -n $OUT && $OUT != /* ]] && OUT="$PWD/$OUT"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

wanted() { ((${#ONLY[@]} == 0)) || [[ " ${ONLY[*]} " == *" $1 "* ]]; }

# --- environment --------------------------------------------------------------------------------
PROBLEMS=()
note() { echo "gpu.sh: $*" >&2; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    PROBLEMS+=("no Python interpreter '$PYTHON' (set PYTHON=...)")
    DEVICE=""
else
    # First line: the sanitised device name, or 'none'; then one line per problem.
    CHECK=$("$PYTHON" - 2>&1 <<'EOF'
import importlib
import re

problems = []
for module in ("agentsd", "diffusers", "transformers", "tomesd", "matplotlib", "pytest"):
    try:
        importlib.import_module(module)
    except ImportError:
        problems.append(f"Python module '{module}' is missing (pip install -e '.[bench,dev]')")
try:
    import torch
except ImportError:
    print("none")
else:
    if torch.cuda.is_available():
        print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-") or "unknown")
    else:
        print("none")
        problems.append(f"torch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda})")
print("\n".join(problems))
EOF
    )
    DEVICE=$(head -n 1 <<<"$CHECK")
    [[ $DEVICE == none ]] && DEVICE=""
    while IFS= read -r line; do
        [[ -n $line ]] && PROBLEMS+=("$line")
    done < <(tail -n +2 <<<"$CHECK")
fi

HAS_COMPILE=0 HAS_MAX_DOWNSAMPLE=0
if ! BENCH_HELP=$("$PYTHON" -m agentsd bench --help 2>&1); then
    PROBLEMS+=("'$PYTHON -m agentsd bench --help' fails: $(tail -n 1 <<<"$BENCH_HELP")")
    BENCH_HELP=""
fi
[[ $BENCH_HELP == *--compile* ]] && HAS_COMPILE=1
[[ $BENCH_HELP == *--max-downsample* ]] && HAS_MAX_DOWNSAMPLE=1
command -v nvidia-smi >/dev/null 2>&1 || note "nvidia-smi not found: env.txt will lack the driver version"

OUT=${OUT:-benchmarks/results/gpu-${DEVICE:-DEVICE}}

if ((${#PROBLEMS[@]})); then
    for problem in "${PROBLEMS[@]}"; do note "environment: $problem"; done
    if ((!DRY)); then
        note "error: cannot run (see above)"
        exit 2
    fi
    note "dry run: a real run would stop here; the commands it would run follow"
fi
if ((!DRY)) && [[ -d $OUT ]] && [[ -n $(ls -A "$OUT") ]] && ((!OVERWRITE)); then
    note "error: $OUT already holds results: pass --overwrite or choose another --out"
    exit 2
fi

# --- steps --------------------------------------------------------------------------------------
FAILED=()
STEPS=0

# step NAME LOGFILE COMMAND...: print the command; unless dry, run it, tee its output to LOGFILE
# (under $OUT; "-" for none) and record it in runs.md.
step() {
    local name=$1 log=$2
    shift 2
    STEPS=$((STEPS + 1))
    local shown
    shown=$(printf '%q ' "$@")
    echo "+ ${shown% }"
    ((DRY)) && return 0
    local rc
    if [[ $log == - ]]; then
        "$@"
        rc=$?
    else
        "$@" 2>&1 | tee "$OUT/$log"
        rc=${PIPESTATUS[0]}
    fi
    printf '| %s | `%s` | %s |\n' "$name" "${shown% }" "$rc" >>"$OUT/runs.md"
    ((rc == 0)) || FAILED+=("$name (exit $rc)")
}

if ((!DRY)); then
    mkdir -p "$OUT" || exit 2
    printf '# GPU runs\n\n| step | command | exit |\n|---|---|---|\n' >"$OUT/runs.md"
fi

echo "# environment -> $OUT/env.txt"
if ((!DRY)); then
    {
        date -u '+date: %Y-%m-%d %H:%M UTC'
        echo "commit: $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
        "$PYTHON" - <<'EOF'
import platform
from importlib import metadata
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()})")
for package in ("agentsd", "diffusers", "transformers", "tomesd", "accelerate"):
    try:
        print(f"{package} {metadata.version(package)}")
    except metadata.PackageNotFoundError:
        print(f"{package} not installed")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
EOF
        command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
fi

if wanted tests; then
    echo "# CUDA tests -> $OUT/test_cuda.txt"
    step tests test_cuda.txt "$PYTHON" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider
fi

OVERWRITE_FLAG=()
((OVERWRITE)) && OVERWRITE_FLAG=(--overwrite)

if wanted bench; then
    # One UNet denoising step per method (the rows of agentsd bench), fp16, batch 2 = one image with CFG.
    COMPILE_FLAG=()
    if ((HAS_COMPILE)); then
        COMPILE_FLAG=(--compile)  # compiled rows next to the eager ones
    else
        note "compiled rows skipped: the installed 'agentsd bench' has no --compile (eager rows only)"
    fi
    BENCH=(-m agentsd bench --random-weights --methods unpatched tomesd agentsd-agent agentsd-tome agentsd bound
        --dtype fp16 --batch 2 --device cuda "${COMPILE_FLAG[@]}" "${OVERWRITE_FLAG[@]}")
    echo "# UNet-step benchmark matrix -> $OUT/bench-*/"
    step bench-sd15 bench-sd15.txt "$PYTHON" "${BENCH[@]}" --arch sd15 --resolution 512 1024 2048 --out "$OUT/bench-sd15"
    step bench-sdxl bench-sdxl.txt "$PYTHON" "${BENCH[@]}" --arch sdxl --resolution 1024 2048 --out "$OUT/bench-sdxl"
    if ((HAS_MAX_DOWNSAMPLE)); then
        # Does patching the second level pay at 2048? (compare with the 2048 rows of bench-sd15)
        step bench-sd15-2048-md2 bench-sd15-2048-md2.txt "$PYTHON" "${BENCH[@]}" --arch sd15 --resolution 2048 \
            --max-downsample 2 --out "$OUT/bench-sd15-2048-max-downsample-2"
    else
        note "max_downsample=2 step rows skipped: 'agentsd bench' has no --max-downsample (the generation timings cover it)"
    fi
fi

if wanted generation; then
    # Whole 50-step generations (text encoder + UNet + VAE), seconds per image.
    GEN=(benchmarks/bench_generation.py --methods unpatched tomesd:0.4 agentsd:0.4 --steps 50 --dtype fp16
        --device cuda --repeats 3 --warmup 1 "${OVERWRITE_FLAG[@]}")
    echo "# whole generations -> $OUT/generation-*/"
    step generation-sd15 generation-sd15.txt "$PYTHON" "${GEN[@]}" --arch sd15 --resolution 512 1024 2048 \
        --out "$OUT/generation-sd15"
    step generation-sdxl generation-sdxl.txt "$PYTHON" "${GEN[@]}" --arch sdxl --resolution 1024 2048 \
        --out "$OUT/generation-sdxl"
    # Does patching the second level pay at 2048? (compare with the 2048 rows of generation-sd15)
    step generation-sd15-2048-md2 generation-sd15-2048-md2.txt "$PYTHON" "${GEN[@]}" --arch sd15 --resolution 2048 \
        --max-downsample 2 --out "$OUT/generation-sd15-2048-max-downsample-2"
fi

if ((DRY)); then
    echo "# dry run: $STEPS commands; nothing was run or written"
    exit 0
fi
if ((${#FAILED[@]})); then
    note "failed: ${FAILED[*]} (logs in $OUT)"
    exit 1
fi
note "all $STEPS steps passed; results in $OUT"
