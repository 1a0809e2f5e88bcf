#!/usr/bin/env bash
# The whole test suite in one command: unit tests, the simulator's own
# tests, and end-to-end tests with the real OpenSSH client (ssh, scp, sftp)
# and, where a test needs one, a real sshd.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --workspace --no-fail-fast "$@"
