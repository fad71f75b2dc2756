#!/usr/bin/env bash
# Build the side environment for make_reference.py (default /tmp/ir-env), about 2 minutes.
set -euo pipefail
ENV=${1:-/tmp/ir-env}
HERE=$(cd "$(dirname "$0")" && pwd)
python3.11 -m venv "$ENV"
"$ENV/bin/pip" install -q --upgrade "pip>=26"
"$ENV/bin/pip" install -q torch==2.13.0
echo "torch==2.13.0" > "$ENV/torch-constraint.txt"
"$ENV/bin/pip" install -q -c "$ENV/torch-constraint.txt" -r "$HERE/requirements.txt"
"$ENV/bin/pip" install -q --no-deps -r "$HERE/requirements-nodeps.txt"
HF_HUB_OFFLINE=1 "$ENV/bin/python" -c "
import sys; sys.path.insert(0, '$HERE')
import original_env, torch, transformers, torchvision
from ImageReward.ImageReward import ImageReward
print('side env ready:', torch.__version__, transformers.__version__, torchvision.__version__)"
