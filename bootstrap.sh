#!/usr/bin/env bash
# Creates (or refreshes) the base environment .venv: torch (CPU), bitsandbytes, nox and the test tools.
# Idempotent: a second run only checks. Every nox session shares this interpreter's torch; none installs its own.
set -euo pipefail
cd "$(dirname "$0")"
PY="${MOE_COMPAT_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.requirements-base.sha256
want=$(sha256sum requirements/base.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q -r requirements/base.txt
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import torch, bitsandbytes, nox, hypothesis, xdist; print('base env ok: torch', torch.__version__, '| bitsandbytes', bitsandbytes.__version__)" 2>/dev/null
