#!/usr/bin/env bash
# The real-Coder suite: real OpenSSH through coder-proxy (and through the
# real `coder ssh --stdio`) to a real coderd with its embedded DERP relay,
# a real workspace agent and real builds (echo provisioner), on PostgreSQL.
#
# It needs Go (the machine's own; GOTOOLCHAIN=local, nothing else is
# fetched), PostgreSQL (installed from Debian's packages when missing and
# this runs as root), OpenSSH and cargo. A missing part is a failure,
# never a skip. Go's module and build caches live in ~/.cache/coder-proxy
# (override with CODER_PROXY_GOMODCACHE / CODER_PROXY_GOCACHE), so a second
# run only relinks.
#
#   scripts/interop.sh                          # the whole suite
#   scripts/interop.sh -test.run 'TestStop'     # flags go to the test binary
#   scripts/interop.sh --bench OUT.md           # the side-by-side benchmarks
#                                               # (release coder-proxy; scripts/bench.sh)
#
# The suite ends with "N passed, M failed" (every test and subtest counted
# once; a skip counts as a failure).
set -euo pipefail
cd "$(dirname "$0")/.."

bench_out=
if [ "${1:-}" = --bench ]; then
  bench_out=$(realpath -m "${2:?--bench needs an output file}")
  shift 2
fi

say() { echo "interop: $*" >&2; }
die() { say "$*"; exit 1; }

# --- Go ---------------------------------------------------------------------
command -v go >/dev/null 2>&1 || die "Go is required for the real-Coder suite (the machine's Go 1.26.x); none on PATH"
export GOTOOLCHAIN=local
export GOMODCACHE="${CODER_PROXY_GOMODCACHE:-$HOME/.cache/coder-proxy/go-mod}"
export GOCACHE="${CODER_PROXY_GOCACHE:-$HOME/.cache/coder-proxy/go-build}"
export GOFLAGS="${GOFLAGS:-} -mod=readonly"
mkdir -p "$GOMODCACHE" "$GOCACHE"
say "$(go version) (GOMODCACHE=$GOMODCACHE GOCACHE=$GOCACHE)"

# --- PostgreSQL on 127.0.0.1:5432, postgres/postgres --------------------------
pg_url='postgres://postgres:postgres@127.0.0.1:5432/postgres?sslmode=disable'
pg_ok() { psql "$pg_url" -qtAc 'select 1' >/dev/null 2>&1; }
if ! pg_ok; then
  if [ "$(id -u)" != 0 ]; then
    die "PostgreSQL is not answering on 127.0.0.1:5432 as postgres/postgres; run this as root to set it up, or start it yourself"
  fi
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    say "installing PostgreSQL from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  pgv=$(ls /usr/lib/postgresql | sort -V | tail -1)
  pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$pgv main" || pg_createcluster "$pgv" main >/dev/null
  conf=/etc/postgresql/$pgv/main/conf.d/coder-proxy-interop.conf
  # Test databases only: durability off for speed; coderdtest opens many
  # connections per test.
  cat >"$conf" <<'EOF'
listen_addresses = 'localhost'
port = 5432
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 500
EOF
  pg_ctlcluster "$pgv" main status >/dev/null 2>&1 && pg_ctlcluster "$pgv" main restart || pg_ctlcluster "$pgv" main start
  runuser -u postgres -- psql -qc "ALTER USER postgres PASSWORD 'postgres'" >/dev/null
  for _ in $(seq 1 50); do pg_ok && break; sleep 0.2; done
  pg_ok || die "PostgreSQL $pgv started but does not accept postgres/postgres on 127.0.0.1:5432"
fi
say "PostgreSQL answers on 127.0.0.1:5432"

# --- OpenSSH ------------------------------------------------------------------
for b in ssh scp sftp; do
  command -v "$b" >/dev/null 2>&1 || die "$b is required (apt-get install openssh-client)"
done

# --- Binaries -------------------------------------------------------------------
t0=$(date +%s)
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [ -n "$bench_out" ]; then
  cargo build --quiet --release --bin coder-proxy
  proxy_bin=$target_dir/release/coder-proxy
else
  cargo build --quiet --bin coder-proxy
  proxy_bin=$target_dir/debug/coder-proxy
fi
[ -x "$proxy_bin" ] || die "no coder-proxy binary at $proxy_bin"
cd interop
mkdir -p bin
say "building the real coder CLI and the suite (the first build takes a while)"
go build -o bin/coder github.com/coder/coder/v2/cmd/coder
go test -c -o bin/interop.test .
t1=$(date +%s)
say "built in $((t1 - t0))s"

# --- Run ----------------------------------------------------------------------------
run=$(mktemp -d /tmp/coder-proxy-interop.XXXXXX)
export INTEROP_LOG_DIR=$run/logs INTEROP_REPORT=$run/side-by-side.md
export CODER_PROXY_BIN=$proxy_bin CODER_CLI_BIN=$PWD/bin/coder
export DB=ci
INTEROP_CODER_VERSION=$(go list -m -f '{{.Version}}' github.com/coder/coder/v2)
export INTEROP_CODER_VERSION
if [ -n "$bench_out" ]; then
  export INTEROP_BENCH_OUT=$bench_out
  ./bin/interop.test -test.run '^$' -test.bench SideBySide -test.benchtime 1x -test.timeout 60m "$@" 2>&1 | tee "$run/bench.txt"
  [ "${PIPESTATUS[0]}" = 0 ] && [ -s "$bench_out" ] || die "the side-by-side benchmark failed (logs in $run)"
  say "side-by-side table written to $bench_out"
  exit 0
fi
set +e
./bin/interop.test -test.v -test.count=1 -test.timeout=40m "$@" 2>&1 | tee "$run/raw.txt"
status=${PIPESTATUS[0]}
set -e
go tool test2json -t <"$run/raw.txt" >"$run/events.json"
read -r passed failed < <(python3 - "$run/events.json" <<'EOF'
import json, sys
res = {}
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("Test") and e.get("Action") in ("pass", "fail", "skip"):
        res[e["Test"]] = e["Action"]
print(sum(v == "pass" for v in res.values()), sum(v != "pass" for v in res.values()))
EOF
)
t2=$(date +%s)
say "ran in $((t2 - t1))s; logs in $run/logs; side-by-side notes in $INTEROP_REPORT"
[ -f "$INTEROP_REPORT" ] && cat "$INTEROP_REPORT" >&2
echo "$passed passed, $failed failed"
if [ "$status" != 0 ] || [ "$failed" != 0 ] || [ "$passed" = 0 ]; then
  exit 1
fi
