#!/usr/bin/env bash
# The GPU picture in one lease: one command, at most --budget seconds of wall time (default 540 = 9
# minutes, installing included), steps in priority order under that one deadline, each with its own
# time limit. All models have random weights (nothing is downloaded).
#
#   1 tests        tests/test_cuda.py, and the CUDA timer (tests/tools/test_measure.py)
#   2 steps-sd15   eager UNet steps, SD 1.5 at 512, 1024, 2048; fp16, one image with CFG, ratio 0.4:
#     steps-sdxl   unpatched, tomesd, agent phase, late phase, schedule, bound (SD 1.5 also: the agent
#                  phase and the schedule with merge_mlp, +mlp); SDXL at 1024, 2048
#   3 paper-math   the paper's speed table (SD 1.5, 512, 50 PLMS steps, ToMeSD and AgentSD at
#     paper-default  r = 0.1 ... 0.5), SDPA held to the math kernel (the paper's baseline), then default
#   4 compiled     compiled rows (inductor, regional as generate --compile) at 1024, 2048: unpatched,
#                  schedule; then with CUDA graphs (--compile-mode reduce-overhead) at 512, 1024:
#     compiled-graphs  unpatched, agent phase, schedule, bound
#   5 generation   whole 50-step generations at 1024, SD 1.5 and SDXL: unpatched, tomesd, AgentSD 0.4
#
# A failing step does not stop the later ones; a step cut by its limit keeps every row it finished
# (agentsd bench writes each row as soon as it is measured). Results go flat into one folder:
#   gpu.md         the steps: command, limit, seconds, outcome (rewritten after each step)
#   env.txt        GPU, driver, CUDA, versions, commit
#   test_cuda.txt  pytest output of the CUDA tests
#   results.md     every bench step's report, in step order (each agentsd bench run adds its own)
#   results.csv    every bench row, with status measured / pending
#   speedup.png    every bench step's speed-ups against the ratio
#   log.txt        everything the bench steps printed
#
# On a machine without diffusers and tomesd (the lent GPU machines), carry their wheels: here, with
# PyPI reachable, `bash benchmarks/gpu.sh --fetch-wheels .whl`; there, `bash benchmarks/gpu.sh --wheels
# .whl --out "$OUT"` installs them with pip --no-index --no-deps --target into a temporary folder
# put on PYTHONPATH (this checkout is on PYTHONPATH too: nothing is installed into the environment).

set -uo pipefail

usage() {
    cat <<'EOF'
usage: bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--overwrite] [--budget SECONDS] [--wheels DIR]
                              [--only STEP]... [--smoke]
       bash benchmarks/gpu.sh --fetch-wheels DIR [--dry-run]

  --dry-run            check the environment and print every step (command, time limit); run nothing
  --out DIR            results folder (default: benchmarks/results/gpu-<device name>), flat, 7 files
  --overwrite          replace the results already in that folder (default: refuse to start)
  --budget SECONDS     wall time for everything, installing included (default 540: a 9-minute lease)
  --wheels DIR         first install the wheels in DIR (pip --no-index --no-deps --target, a temporary
                       folder put on PYTHONPATH): diffusers and tomesd where a machine lacks them
  --fetch-wheels DIR   download into DIR the wheels of this machine's diffusers and tomesd versions, for
                       CPython 3.12 on x86-64 Linux (the lent GPU machines); needs PyPI
  --only STEP          run only this step (repeatable): tests, steps, paper, compiled, generation
  --smoke              tiny models on the CPU, every step in a minute or two: checks the script itself
Environment: PYTHON (default python3) is the interpreter with torch.
EOF
}

fail() { echo "gpu.sh: error: $*" >&2; exit 2; }

DRY=0 OVERWRITE=0 SMOKE=0 OUT="" WHEELS="" FETCH="" BUDGET=540 ONLY=()
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --overwrite) OVERWRITE=1 ;;
        --smoke) SMOKE=1 ;;
        --out | --wheels | --fetch-wheels | --budget | --only)
            [[ $# -ge 2 && -n $2 ]] || fail "$1 needs a value (see --help)"
            case $1 in
                --out) OUT=$2 ;;
                --wheels) WHEELS=$2 ;;
                --fetch-wheels) FETCH=$2 ;;
                --budget)
                    [[ $2 =~ ^[0-9]+$ ]] && (($2 >= 1)) || fail "--budget takes whole seconds, got '$2'"
                    BUDGET=$2 ;;
                --only)
                    [[ $2 =~ ^(tests|steps|paper|compiled|generation)$ ]] ||
                        fail "--only takes tests, steps, paper, compiled or generation, got '$2'"
                    ONLY+=("$2") ;;
            esac
            shift ;;
        -h | --help) usage; exit 0 ;;
        *) fail "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

START=$SECONDS
# Everything runs from the repository root, so `python -m agentsd` and the tests use this checkout;
# relative folders stay relative to where the script was started.
[[ -n $OUT && $OUT != /* ]] && OUT="$PWD/$OUT"
[[ -n $WHEELS && $WHEELS != /* ]] && WHEELS="$PWD/$WHEELS"
[[ -n $FETCH && $FETCH != /* ]] && FETCH="$PWD/$FETCH"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || fail "no Python interpreter '$PYTHON' (set PYTHON=...)"

# --- wheels for the device ------------------------------------------------------------------------
if [[ -n $FETCH ]]; then
    VERSIONS=$("$PYTHON" -c 'from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("diffusers", "tomesd")))') ||
        fail "diffusers and tomesd must be installed here: their versions are the ones fetched"
    DOWNLOAD=("$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 -d "$FETCH" $VERSIONS)
    echo "+ $(printf '%q ' "${DOWNLOAD[@]}")"
    ((DRY)) && exit 0
    "${DOWNLOAD[@]}" || fail "pip download failed"
    echo "gpu.sh: wheels in $FETCH: $(cd "$FETCH" && ls -- *.whl | tr '\n' ' ')"
    exit 0
fi

SITE=${TMPDIR:-/tmp}/agentsd-gpu-site
INSTALL=()
if [[ -n $WHEELS ]]; then
    compgen -G "$WHEELS/*.whl" >/dev/null || fail "--wheels $WHEELS holds no .whl file"
    INSTALL=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
        --target "$SITE" "$WHEELS"/*.whl)
    echo "+ $(printf '%q ' "${INSTALL[@]}")"
    if ((!DRY)); then
        "${INSTALL[@]}" || fail "installing the wheels of $WHEELS failed"
    fi
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- environment ----------------------------------------------------------------------------------
# One interpreter start: the first line is the sanitised device name (or 'none'), then one line per
# problem. With --wheels in a dry run the wheels are not installed: a module they hold is no problem.
CHECK=$(SMOKE=$SMOKE WHEEL_NAMES="$(ls "$WHEELS" 2>/dev/null | tr '\n' ' ')" "$PYTHON" - 2>&1 <<'EOF'
import importlib
import os
import re

wheels = {name.split("-")[0].lower() for name in os.environ["WHEEL_NAMES"].split()}
problems = []
for module in ("agentsd", "diffusers", "transformers", "tomesd", "matplotlib", "pytest"):
    try:
        importlib.import_module(module)
    except ImportError as error:
        if (error.name or module) not in wheels:
            problems.append(f"Python module '{module}' cannot be imported ({error})")
try:
    from agentsd.tools.cli import build_parser

    build_parser().parse_args(["bench", "--random-weights", "--batch-size", "1", "--measure", "generation"])
except ImportError as error:
    if error.name not in wheels:
        problems.append(f"'agentsd bench' cannot be loaded here: {error}")
except BaseException as error:  # a broken bench command is reported, not skipped
    problems.append(f"'agentsd bench' is broken here: {type(error).__name__}: {error}")
try:
    import torch
except ImportError:
    print("none")
else:
    if torch.cuda.is_available():
        print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-") or "unknown")
    else:
        print("none")
        if os.environ["SMOKE"] != "1":
            problems.append(f"torch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda})")
print("\n".join(problems))
EOF
)
DEVICE=$(head -n 1 <<<"$CHECK")
[[ $DEVICE == none ]] && DEVICE=""
PROBLEMS=()
while IFS= read -r line; do
    [[ -n $line ]] && PROBLEMS+=("$line")
done < <(tail -n +2 <<<"$CHECK")
((SMOKE)) && DEVICE=cpu-smoke
OUT=${OUT:-$ROOT/benchmarks/results/gpu-${DEVICE:-DEVICE}}
FILES=(gpu.md env.txt test_cuda.txt results.md results.csv speedup.png log.txt)

if ((${#PROBLEMS[@]})); then
    for problem in "${PROBLEMS[@]}"; do echo "gpu.sh: environment: $problem" >&2; done
    ((DRY)) || fail "cannot run (see above)"
    echo "gpu.sh: dry run: a real run would stop here; the plan follows" >&2
fi
if ((!DRY)) && [[ -d $OUT && -n $(ls -A "$OUT") ]]; then
    ((OVERWRITE)) || fail "$OUT already holds results: pass --overwrite or choose another --out"
    for name in "${FILES[@]}"; do rm -f "$OUT/$name"; done
    [[ -n $(ls -A "$OUT") ]] && fail "$OUT holds files gpu.sh did not write: choose another --out"
fi

# --- the plan -------------------------------------------------------------------------------------
if ((SMOKE)); then
    SD=tiny XL=tiny-xl S=64 M=96 L=128 STEPS=2 BACKEND=eager GRAPHS=()
    RUN=(--device cpu --dtype fp32 --threads 1 --repeats 1 --warmup 1)
    GEN_RUN=("${RUN[@]}")
else
    SD=sd15 XL=sdxl S=512 M=1024 L=2048 STEPS=50 BACKEND=inductor GRAPHS=(--compile-mode reduce-overhead)
    RUN=(--device cuda --dtype fp16 --repeats 3 --warmup 1)
    GEN_RUN=(--device cuda --dtype fp16 --repeats 2 --warmup 1)
fi
BENCH=("$PYTHON" -m agentsd bench --random-weights --batch-size 1 --no-progress --out "$OUT")
KINDS=(unpatched tomesd agentsd-agent agentsd-tome agentsd bound)
ALL=(--methods "${KINDS[@]}" --ratios 0.4)
ALL_MLP=(--methods "${KINDS[@]}" agentsd-agent+mlp agentsd+mlp --ratios 0.4)  # issue 15's whole-block rows
PAPER=(--measure generation --arch "$SD" --resolution "$S" --steps "$STEPS" --scheduler pndm
    --methods unpatched tomesd agentsd --ratios 0.1 0.2 0.3 0.4 0.5)

NAMES=() PARTS=() LIMITS=() COMMANDS=()
plan() { # plan NAME PART LIMIT COMMAND...
    NAMES+=("$1") PARTS+=("$2") LIMITS+=("$3")
    COMMANDS+=("$(printf '%q ' "${@:4}")")
}
# Limits from the first run (H200, 2026-11-27; 11 s to install and list the environment): tests 140 s
# (115 of them the five compile tests), steps-sd15 37, steps-sdxl 33, paper-math 104, paper-default 90;
# the compiled step (whole-UNet compilation then, regional since 0.3.2) had no row after 93 s. The full
# plan exceeds one lease: after a first run, ask for what is missing with --only (e.g. --only tests
# --only steps --only compiled).
plan tests tests 200 "$PYTHON" -m pytest tests/test_cuda.py tests/tools/test_measure.py -v -rs -p no:cacheprovider
plan steps-sd15 steps 70 "${BENCH[@]}" "${RUN[@]}" "${ALL_MLP[@]}" --arch "$SD" --resolution "$S" "$M" "$L"
plan steps-sdxl steps 60 "${BENCH[@]}" "${RUN[@]}" "${ALL[@]}" --arch "$XL" --resolution "$M" "$L"
plan paper-math paper 130 "${BENCH[@]}" "${GEN_RUN[@]}" "${PAPER[@]}" --sdpa-kernel math
plan paper-default paper 120 "${BENCH[@]}" "${GEN_RUN[@]}" "${PAPER[@]}" --sdpa-kernel default
plan compiled compiled 200 "${BENCH[@]}" "${RUN[@]}" --arch "$SD" --resolution "$M" "$L" \
    --methods unpatched agentsd --ratios 0.4 --compile --compile-backend "$BACKEND"
plan compiled-graphs compiled 150 "${BENCH[@]}" "${RUN[@]}" --arch "$SD" --resolution "$S" "$M" \
    --methods unpatched agentsd-agent agentsd bound --ratios 0.4 --compile --compile-backend "$BACKEND" \
    ${GRAPHS[@]+"${GRAPHS[@]}"}
plan generation generation 200 "${BENCH[@]}" "${GEN_RUN[@]}" --measure generation --arch "$SD" "$XL" \
    --resolution "$M" --steps "$STEPS" --methods unpatched tomesd agentsd --ratios 0.4

wanted() { ((${#ONLY[@]} == 0)) || [[ " ${ONLY[*]} " == *" $1 "* ]]; }
RESERVE=10   # seconds kept at the end for the summary
MIN_STEP=20  # a step that would get less is skipped
((SMOKE)) && RESERVE=2 MIN_STEP=2

if ((DRY)); then
    echo "# plan: budget ${BUDGET} s from the start, installing included; results in $OUT"
    for i in "${!NAMES[@]}"; do
        wanted "${PARTS[i]}" || continue
        echo "# ${NAMES[i]} (at most ${LIMITS[i]} s)"
        echo "+ ${COMMANDS[i]% }"
    done
    echo "# dry run: nothing was run or written"
    exit 0
fi

# --- running --------------------------------------------------------------------------------------
mkdir -p "$OUT" || exit 2
OUTCOMES=() SECONDS_TAKEN=()

summary() { # gpu.md, rewritten atomically after every step
    {
        echo "# GPU run"
        echo
        echo "- device: ${DEVICE:-none}; $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- budget: ${BUDGET} s for everything (installing included); $((SECONDS - START)) s used"
        [[ -n $WHEELS ]] && echo "- wheels installed from $WHEELS into $SITE (on PYTHONPATH)"
        echo "- files: env.txt, test_cuda.txt, results.md / results.csv / speedup.png (every bench step's), log.txt"
        echo
        echo "| step | limit s | took s | outcome | command |"
        echo "|---|---|---|---|---|"
        for i in "${!NAMES[@]}"; do
            local outcome=${OUTCOMES[i]:-not run yet}
            echo "| ${NAMES[i]} | ${LIMITS[i]} | ${SECONDS_TAKEN[i]:-} | $outcome | \`${COMMANDS[i]% }\` |"
        done
    } >"$OUT/.gpu.md.tmp" && mv -f "$OUT/.gpu.md.tmp" "$OUT/gpu.md"
}

{
    date -u '+date: %Y-%m-%d %H:%M UTC'
    if COMMIT=$(git rev-parse HEAD 2>/dev/null); then
        echo "commit: $COMMIT$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    else
        echo "commit: unknown (no git repository here)"
    fi
    "$PYTHON" - <<'EOF'
import importlib.util
import platform
from importlib import metadata

import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()})")
for package in ("agentsd", "diffusers", "transformers", "tomesd", "accelerate", "huggingface-hub"):
    spec = importlib.util.find_spec(package.replace("-", "_"))
    where = f" ({spec.submodule_search_locations[0]})" if spec and spec.submodule_search_locations else ""
    try:
        print(f"{package} {metadata.version(package)}{where}")
    except metadata.PackageNotFoundError:
        print(f"{package}: no installed metadata{where}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
EOF
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
summary

FAILED=0
for i in "${!NAMES[@]}"; do
    name=${NAMES[i]}
    if ! wanted "${PARTS[i]}"; then
        OUTCOMES[i]="not asked for (--only)"
        continue
    fi
    left=$((BUDGET - (SECONDS - START) - RESERVE))
    limit=$((left < LIMITS[i] ? left : LIMITS[i]))
    if ((limit < MIN_STEP)); then
        OUTCOMES[i]="skipped: no time left (${left} s)"
        FAILED=1
        summary
        continue
    fi
    echo "# ${name}, at most ${limit} s: ${COMMANDS[i]% }"
    log=log.txt
    [[ $name == tests ]] && log=test_cuda.txt
    echo "# ${name}, at most ${limit} s: ${COMMANDS[i]% }" >>"$OUT/$log"
    began=$SECONDS
    # SIGTERM at the limit (agentsd bench then writes what it has, marked), SIGKILL 15 s later
    eval "timeout -s TERM -k 15 $limit ${COMMANDS[i]}" 2>&1 | tee -a "$OUT/$log"
    rc=${PIPESTATUS[0]}
    SECONDS_TAKEN[i]=$((SECONDS - began))
    case $rc in
        0) OUTCOMES[i]=ok ;;
        124 | 137) OUTCOMES[i]="timed out at ${limit} s (the rows it finished are kept)"; FAILED=1 ;;
        *) OUTCOMES[i]="failed (exit $rc; see $log)"; FAILED=1 ;;
    esac
    echo "# ${name}: ${OUTCOMES[i]} after ${SECONDS_TAKEN[i]} s"
    summary
done

summary
cat "$OUT/gpu.md"
echo "gpu.sh: $((SECONDS - START)) s; results in $OUT"
exit $FAILED
