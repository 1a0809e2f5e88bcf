#!/usr/bin/env bash
# The performance suite in one command: checks/installs what it needs
# (OpenSSH client and server, socat), then builds release binaries and runs
#  1. `benches/suite.rs` against coder-sim, which prints a table of medians
#     (min–max) next to same-run baselines (socat, nc) and writes it into
#     docs/PERFORMANCE.md;
#  2. the side-by-side part ("real"): coder-proxy against the real
#     `coder ssh --stdio` on one real coderd + agent (interop/, via
#     scripts/interop.sh --bench; needs Go and PostgreSQL), written into the
#     "Against the real Coder CLI" block of docs/PERFORMANCE.md.
#
#   ./scripts/bench.sh                          # everything (~10 min + builds)
#   BENCH_ONLY=real ./scripts/bench.sh          # only the side-by-side part
#   BENCH_ONLY=startup,reaction ./scripts/bench.sh
#   BENCH_RUNS=15 BENCH_XFER_RUNS=5 ./scripts/bench.sh
#   BENCH_NO_WRITE=1 ./scripts/bench.sh         # print only
#
# Knobs: BENCH_RUNS (9), BENCH_XFER_RUNS (3), BENCH_XFER_MIB (1024),
# BENCH_SESSIONS (50), BENCH_ONLY, BENCH_NO_WRITE, BENCH_DOC; for the real
# part INTEROP_BENCH_RUNS (9), INTEROP_BENCH_XFER_RUNS (3),
# INTEROP_BENCH_XFER_MIB (256), INTEROP_BENCH_SESSIONS (20).
# Not part of `cargo test` or .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v socat >/dev/null 2>&1 || need+=(socat)
if [ "${#need[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "bench: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "bench: missing ${need[*]}; install them (as root: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

# The binary under test is the one `cargo build --release` ships. `cargo
# bench` would measure its own build instead, whose dependency features are
# unified with the dev-dependencies (coder-sim pulls in tokio "full", hyper's
# server side, …) and which is larger; so build the release binary here and
# hand it over. The harness (and the coder-sim it links) builds in its own
# target directory, without LTO, so it neither overwrites
# target/release/coder-proxy nor takes long to rebuild.
cargo build --release --bin coder-proxy
target="${CARGO_TARGET_DIR:-$PWD/target}"
export CODER_PROXY_BENCH_BIN="$target/release/coder-proxy"
export CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_CODEGEN_UNITS=16

only=",${BENCH_ONLY:-},"
sim_parts=$(echo "${BENCH_ONLY:-}" | tr ',' '\n' | grep -vx 'real' | grep -v '^$' || true)
if [ -z "${BENCH_ONLY:-}" ] || [ -n "$sim_parts" ]; then
  cargo bench --bench suite --target-dir "$target/bench" "$@"
fi
if [ -z "${BENCH_ONLY:-}" ] || [[ "$only" == *,real,* ]]; then
  table=$(mktemp /tmp/coder-proxy-real-bench.XXXXXX.md)
  ./scripts/interop.sh --bench "$table"
  if [ "${BENCH_NO_WRITE:-}" != 1 ]; then
    python3 - "${BENCH_DOC:-docs/PERFORMANCE.md}" "$table" <<'EOF'
import sys
doc, table = sys.argv[1], open(sys.argv[2]).read().strip()
begin = "<!-- BEGIN REAL-CODER RESULTS (written by scripts/bench.sh) -->"
end = "<!-- END REAL-CODER RESULTS -->"
text = open(doc).read()
block = f"{begin}\n\n{table}\n\n{end}"
a, b = text.find(begin), text.find(end)
if a >= 0 and b > a:
    text = text[:a] + block + text[b + len(end):]
else:
    text = text.rstrip() + "\n\n## Against the real Coder CLI\n\n" + block + "\n"
open(doc, "w").write(text)
EOF
  fi
  cat "$table"
fi
