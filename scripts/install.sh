#!/usr/bin/env bash
# Idempotent set-up. A machine whose torch already imports with CUDA (the GPU runner) gets
# nothing installed: it must run on what is there. Elsewhere, install the CPU requirements.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "install: torch with CUDA found ($("$PYTHON" -c 'import torch; print(torch.__version__)')); installing nothing"
    exit 0
fi
if "$PYTHON" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.13.0", "triton": "3.6.0"}
ok = all(md.version(p).split("+")[0] == v for p, v in want.items())
for mod in ("yaml", "pandas", "jinja2", "tabulate", "tqdm", "matplotlib", "pytest", "xdist"):
    __import__(mod)
sys.exit(0 if ok else 1)
PY
then
    echo "install: CPU requirements already satisfied"
    exit 0
fi
"$PYTHON" -m pip install --disable-pip-version-check -q -r requirements-cpu.txt
echo "install: CPU requirements installed (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
