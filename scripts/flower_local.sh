#!/usr/bin/env bash
# Local rehearsal of a Flower deployment (issues 4 and 9): one SuperLink and N SuperNodes on
# loopback (SuperNode i has --node-config "partition-id=i num-partitions=N"), then `flwr run` of
# this package's Flower app (pyproject.toml [tool.flwr.app]) with the given raflora config.
# By default over TLS with SuperNode authentication, as a real deployment should run: a throw-away
# CA signs a certificate for 127.0.0.1, each SuperNode gets an ECDSA P-384 key pair whose public
# key is registered with the SuperLink (`flwr supernode register`) before the SuperNode starts.
# Every process started here is stopped by its PID on exit, whatever happens.
#
#   scripts/flower_local.sh [--insecure] [--check-unregistered] CONFIG [N] [RUN_DIR]
#
# CONFIG   a raflora YAML (its fl.num_clients must equal N)
# N        number of SuperNodes (default: the config's fl.num_clients)
# RUN_DIR  run directory (default: runs/flower-local-<time>)
# --insecure            plain HTTP, no SuperNode authentication (trusted networks only)
# --check-unregistered  first start a SuperNode with a key that is not registered; it must be
#                       refused (exit non-zero), or the rehearsal fails
#
# Environment: RAFLORA_FLOWER_WORKDIR (logs, certificates, keys, FLWR_HOME; default: a temp dir),
# RAFLORA_FLOWER_PIDS (a file that receives the started PIDs), RAFLORA_FLOWER_OVERRIDES
# (key=value raflora overrides, space-separated), RAFLORA_FLOWER_DATABASE (the SuperLink's SQLite
# state file; default: state in memory, which large messages need, see large_message_check.py).
# Needs flwr (pip install 'raflora[flower]') and, without --insecure, openssl.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
INSECURE=0
CHECK_UNREGISTERED=0
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --insecure) INSECURE=1 ;;
        --check-unregistered) CHECK_UNREGISTERED=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) ARGS+=("$arg") ;;
    esac
done
if [[ ${#ARGS[@]} -lt 1 || ${#ARGS[@]} -gt 3 ]]; then usage >&2; exit 2; fi
if ((INSECURE && CHECK_UNREGISTERED)); then
    echo "--check-unregistered needs SuperNode authentication: drop --insecure" >&2
    exit 2
fi
if ((!INSECURE)) && ! command -v openssl >/dev/null; then
    echo "openssl is needed for the TLS rehearsal (or pass --insecure on a trusted network)" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The checkout's environment (make install) when there is one: python, flwr, flower-superlink …
if [[ -x "$ROOT/.venv/bin/python" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
PYTHON="${PYTHON:-python}"
CONFIG="$(realpath "${ARGS[0]}")"
N="${ARGS[1]:-$("$PYTHON" -c 'import sys; from raflora.config import load_config; print(load_config(sys.argv[1]).fl.num_clients)' "$CONFIG")}"
RUN_DIR="$(realpath -m "${ARGS[2]:-runs/flower-local-$(date +%Y%m%d-%H%M%S)}")"
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

make_certificates() {  # make_certificates DIR: throw-away CA, server certificate for 127.0.0.1
    local dir="$1"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=raflora throw-away CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
        "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >"$dir/server.ext"
    openssl x509 -req -days 2 -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
}

make_node_key() {  # make_node_key PATH: ECDSA P-384 key pair, OpenSSH format (PATH, PATH.pub)
    rm -f "$1" "$1.pub"
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$(basename "$1")" -f "$1"
    else  # the cryptography package comes with flwr
        "$PYTHON" - "$1" <<'PY'
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
path = Path(sys.argv[1])
path.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
path.with_name(path.name + ".pub").write_bytes(
    key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
)
PY
    fi
}

# Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTP(S) port.
PORT="$(free_port)"
LINK_SECURITY=(--insecure)
NODE_SECURITY=(--insecure)
CONNECTION_SECURITY="insecure = true"
if ((!INSECURE)); then
    PKI="$WORK/pki"
    mkdir -p "$PKI"
    chmod 700 "$PKI"
    make_certificates "$PKI"
    LINK_SECURITY=(--ssl-ca-certfile "$PKI/ca.crt" --ssl-certfile "$PKI/server.crt"
        --ssl-keyfile "$PKI/server.key" --enable-supernode-auth)
    NODE_SECURITY=(--root-certificates "$PKI/ca.crt")
    CONNECTION_SECURITY="root-certificates = \"$PKI/ca.crt\""
fi
DATABASE=()
if [[ -n "${RAFLORA_FLOWER_DATABASE:-}" ]]; then DATABASE=(--database "$RAFLORA_FLOWER_DATABASE"); fi
start "$WORK/superlink.log" flower-superlink "${LINK_SECURITY[@]}" --host 127.0.0.1 \
    --port "$PORT" "${DATABASE[@]}" --disable-runtime-dependency-installation
wait_port "$PORT"

cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local-rehearsal"

[superlink.local-rehearsal]
address = "127.0.0.1:$PORT"
$CONNECTION_SECURITY
TOML

if ((!INSECURE)); then
    for ((i = 0; i < N; i++)); do
        make_node_key "$PKI/supernode-$i"
        flwr supernode register "$PKI/supernode-$i.pub" local-rehearsal --name "supernode-$i" \
            >"$WORK/register-$i.log" 2>&1 || {
            cat "$WORK/register-$i.log" >&2
            echo "could not register SuperNode $i's public key (see $WORK/register-$i.log)" >&2
            exit 1
        }
    done
fi

if ((CHECK_UNREGISTERED)); then
    # A SuperNode whose key the SuperLink does not know must be refused before it gets any work.
    make_node_key "$PKI/unregistered"
    set +e
    timeout 120 flower-supernode "${NODE_SECURITY[@]}" --superlink "127.0.0.1:$PORT" \
        --port "$(free_port)" --auth-supernode-private-key "$PKI/unregistered" \
        --node-config "partition-id=0 num-partitions=$N" >"$WORK/unregistered.log" 2>&1
    status=$?
    set -e
    if ((status == 0 || status == 124)); then
        echo "a SuperNode with an unregistered key was not refused (see $WORK/unregistered.log)" >&2
        exit 1
    fi
    if ! grep -q "Failed to activate SuperNode" "$WORK/unregistered.log"; then
        echo "the unregistered SuperNode stopped (exit $status) but not because the SuperLink" \
            "refused it (see $WORK/unregistered.log)" >&2
        exit 1
    fi
    echo "SuperNode with an unregistered key refused: not activated, exit $status"
fi

for ((i = 0; i < N; i++)); do
    NODE_AUTH=()
    if ((!INSECURE)); then NODE_AUTH=(--auth-supernode-private-key "$PKI/supernode-$i"); fi
    start "$WORK/supernode-$i.log" flower-supernode "${NODE_SECURITY[@]}" "${NODE_AUTH[@]}" \
        --superlink "127.0.0.1:$PORT" --port "$(free_port)" \
        --node-config "partition-id=$i num-partitions=$N"
done

MODE="TLS, SuperNode authentication"
if ((INSECURE)); then MODE="INSECURE: no TLS, no SuperNode authentication"; fi
echo "SuperLink on 127.0.0.1:$PORT ($MODE), $N SuperNodes; logs in $WORK"
flwr run "$ROOT" local-rehearsal --stream --run-config \
    "config-file='$CONFIG' run-dir='$RUN_DIR' overrides='${RAFLORA_FLOWER_OVERRIDES:-}'"
if [[ ! -f "$RUN_DIR/summary.json" ]]; then
    echo "the run did not finish: no $RUN_DIR/summary.json (see $WORK/*.log)" >&2
    exit 1
fi
echo "run directory: $RUN_DIR"
