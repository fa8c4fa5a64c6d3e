#!/usr/bin/env bash
# Create .venv and install closedloop: torch first (the CPU build where no GPU is present),
# then the package with its dependencies, then the WOMD protos without their ancient pins.
#   TORCH_SPEC   torch requirement (default torch==2.13.0)
#   TORCH_INDEX  extra index for torch wheels, e.g. https://download.pytorch.org/whl/cpu
#   EXTRAS       package extras to install, e.g. test
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX:-}" ]; then
    "${PIP[@]}" "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX"
  else
    "${PIP[@]}" "$TORCH_SPEC"
  fi
fi
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
"${PIP[@]}" -e "$spec"
"$PY" -c "import waymo_open_dataset.protos.scenario_pb2" 2>/dev/null \
  || "${PIP[@]}" --no-deps "waymo-open-dataset-tf-2-12-0==1.6.7"
"$PY" -c "import closedloop, torch; print('closedloop', closedloop.__version__, 'torch', torch.__version__)"
