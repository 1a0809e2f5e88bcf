#!/usr/bin/env bash
# The whole test suite in one command:
#  1. cargo's tests: unit tests, the simulator's own tests, and end-to-end
#     tests with the real OpenSSH client (ssh, scp, sftp) through coder-proxy
#     to coder-sim (and, where a test needs one, a real sshd);
#  2. the real-Coder suite (scripts/interop.sh): real OpenSSH through
#     coder-proxy and the real `coder ssh --stdio` to a real coderd, agent
#     and builds, on PostgreSQL (set up when missing, as root).
# Arguments go to `cargo test` (e.g. a test-name filter); the real-Coder
# suite always runs whole. The last line is "N passed, M failed" over both
# parts (the real-Coder suite prints its own such line before).
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp /tmp/coder-proxy-test.XXXXXX)
trap 'rm -f "$log" "$log.interop"' EXIT

cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
rust=${PIPESTATUS[0]}
./scripts/interop.sh 2>&1 | tee "$log.interop"
interop=${PIPESTATUS[0]}

read -r rp rf < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p + 0, f + 0 }' "$log")
read -r ip if_ < <(awk '/^[0-9]+ passed, [0-9]+ failed$/ { p = $1; f = $3 } END { print p + 0, f + 0 }' "$log.interop")
# A part that failed without reporting a failed test (a build error, a
# missing tool) still counts as one failure.
[ "$rust" != 0 ] && [ "$rf" = 0 ] && rf=1
[ "$interop" != 0 ] && [ "$if_" = 0 ] && if_=1
echo "test.sh: cargo tests $rp passed, $rf failed; real-Coder suite $ip passed, $if_ failed" >&2
echo "$((rp + ip)) passed, $((rf + if_)) failed"
[ "$rust" = 0 ] && [ "$interop" = 0 ]
