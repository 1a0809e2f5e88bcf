#!/usr/bin/env bash
# The main job in one command: build coder-proxy and coder-sim, start a
# simulated Coder deployment, and ssh through coder-proxy into a stopped
# workspace (autostart), a live session that survives agent status flaps,
# and a session closed promptly when the workspace stops.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v ssh >/dev/null || { echo "demo: the OpenSSH client is required (apt-get install openssh-client)" >&2; exit 1; }
cargo build --quiet --workspace --bins
exec target/debug/coder-sim demo --proxy target/debug/coder-proxy "$@"
