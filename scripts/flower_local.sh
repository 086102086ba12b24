#!/usr/bin/env bash
# Local rehearsal of a Flower deployment (issue 4, item 3): one SuperLink and N SuperNodes on
# loopback (SuperNode i has --node-config "partition-id=i num-partitions=N"), then `flwr run` of
# this package's Flower app (pyproject.toml [tool.flwr.app]) with the given raflora config.
# Every process started here is stopped by its PID on exit, whatever happens.
#
#   scripts/flower_local.sh CONFIG [N] [RUN_DIR]
#
# CONFIG   a raflora YAML (its fl.num_clients must equal N)
# N        number of SuperNodes (default: the config's fl.num_clients)
# RUN_DIR  run directory (default: runs/flower-local-<time>)
#
# Environment: RAFLORA_FLOWER_WORKDIR (logs, state database, FLWR_HOME; default: a temp dir),
# RAFLORA_FLOWER_PIDS (a file that receives the started PIDs), RAFLORA_FLOWER_OVERRIDES
# (key=value raflora overrides, space-separated). Needs flwr (pip install 'raflora[flower]').
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The checkout's environment (make install) when there is one: python, flwr, flower-superlink …
if [[ -x "$ROOT/.venv/bin/python" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
PYTHON="${PYTHON:-python}"
CONFIG="$(realpath "$1")"
N="${2:-$("$PYTHON" -c 'import sys; from raflora.config import load_config; print(load_config(sys.argv[1]).fl.num_clients)' "$CONFIG")}"
RUN_DIR="$(realpath -m "${3:-runs/flower-local-$(date +%Y%m%d-%H%M%S)}")"
WORK="${RAFLORA_FLOWER_WORKDIR:-$(mktemp -d -t raflora-flower.XXXXXX)}"
mkdir -p "$WORK"
WORK="$(realpath "$WORK")"
export FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p "$FLWR_HOME"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start LOG CMD...: run CMD in its own session (process group = its PID), remember it
    local log="$1"; shift
    if command -v setsid >/dev/null; then setsid "$@" >"$log" 2>&1 & else "$@" >"$log" 2>&1 & fi
    PIDS+=("$!")
    if [[ -n "${RAFLORA_FLOWER_PIDS:-}" ]]; then echo "$!" >>"$RAFLORA_FLOWER_PIDS"; fi
}

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {  # wait_port PORT: until something listens on 127.0.0.1:PORT (60 s)
    "$PYTHON" - "$1" <<'PY'
import socket, sys, time
deadline = time.time() + 60
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"nothing listens on 127.0.0.1:{sys.argv[1]} after 60 s")
PY
}

# Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTP port.
PORT="$(free_port)"
start "$WORK/superlink.log" flower-superlink --insecure --host 127.0.0.1 --port "$PORT" \
    --database "$WORK/state.db" --disable-runtime-dependency-installation
wait_port "$PORT"
for ((i = 0; i < N; i++)); do
    start "$WORK/supernode-$i.log" flower-supernode --insecure \
        --superlink "127.0.0.1:$PORT" --port "$(free_port)" \
        --node-config "partition-id=$i num-partitions=$N"
done

cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local-rehearsal"

[superlink.local-rehearsal]
address = "127.0.0.1:$PORT"
insecure = true
TOML

echo "SuperLink on 127.0.0.1:$PORT, $N SuperNodes; logs in $WORK"
flwr run "$ROOT" local-rehearsal --stream --run-config \
    "config-file='$CONFIG' run-dir='$RUN_DIR' overrides='${RAFLORA_FLOWER_OVERRIDES:-}'"
if [[ ! -f "$RUN_DIR/summary.json" ]]; then
    echo "the run did not finish: no $RUN_DIR/summary.json (see $WORK/*.log)" >&2
    exit 1
fi
echo "run directory: $RUN_DIR"
