#!/usr/bin/env bash
# The whole test suite in one command:
#  1. cargo's tests: unit tests, the simulator's own tests, and end-to-end
#     tests with the real OpenSSH client (ssh, scp, sftp) through coder-proxy
#     to coder-sim (and, where a test needs one, a real sshd);
#  2. the real-Coder suite (scripts/interop.sh): real OpenSSH through
#     coder-proxy and the real `coder ssh --stdio` to a real coderd, agent
#     and builds, on PostgreSQL (set up when missing, as root).
# Arguments go to `cargo test` (e.g. a test-name filter); the real-Coder
# suite always runs whole. It ends with "N passed, M failed" for that suite.
set -uo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --no-fail-fast "$@"
rust=$?
./scripts/interop.sh
interop=$?
if [ "$rust" != 0 ] || [ "$interop" != 0 ]; then
  echo "test.sh: FAILED (cargo tests exit $rust, real-Coder suite exit $interop)" >&2
  exit 1
fi
echo "test.sh: all passed" >&2
