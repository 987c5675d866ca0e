#!/usr/bin/env bash
# One command: install what is missing, build, and start a local cluster (2 gateways on ports
# 3000 and 3001, 2 workers, NATS and Redis on loopback). Stop it with `deploy/local/cluster.sh stop`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
exec bash deploy/local/cluster.sh start "$@"
