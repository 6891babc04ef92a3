#!/usr/bin/env bash
# swimlane's durable pipeline against the Ray + PyTorch peer (bench/ray_peer.py) on the
# same users, in one command: users retrained per core-minute for both, and the ratio,
# on the embedded bus and over Kafka (a tansu broker this script starts).
#
#   bench/vs_ray.sh                        # defaults: 96 users x up to 250 corrections
#   USERS=300 TRAINERS=1,2 BUSES="embedded" bench/vs_ray.sh
#   PARTITIONS=2 BUSES=kafka bench/vs_ray.sh   # partitions per topic (default 8)
#   TANSU=/path/to/tansu bench/vs_ray.sh   # another broker build (default: the one .ci/run
#                                          # installs, built at opt-level 1)
#
# Writes bench/out/vs_ray_<bus>.json (gitignored) and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/bench/out
mkdir -p "$OUT"
VENV=${VENV:-$HOME/.cache/swimlane-bench-venv}
TOOLS=${TOOLS:-$HOME/.cache/swimlane-tools}
USERS=${USERS:-96}
CORRECTIONS=${CORRECTIONS:-250}
TRAINERS=${TRAINERS:-1,2}
PACED=${PACED:-10}
BUSES=${BUSES:-"embedded kafka"}
# Partitions per topic (the config's default is 8). Over tansu every partition costs
# each consumer's every fetch (bench/README.md, "Partitions over tansu").
PARTITIONS=${PARTITIONS:-8}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/swimlane-target}

echo "== building swimlane (release, with Kafka)" >&2
cargo build --release -q -p swimlane --features kafka
BIN=$CARGO_TARGET_DIR/release/swimlane

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import ray, torch, safetensors' 2>/dev/null; then
  echo "== installing torch, ray and safetensors into $VENV (about 6 GB, a few minutes)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch 'ray==2.*' safetensors numpy
fi

broker=""
cleanup() { [ -n "$broker" ] && kill "$broker" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
for bus in $BUSES; do
  url=embedded
  if [ "$bus" = kafka ]; then
    TANSU=${TANSU:-$TOOLS/bin/tansu}
    if [ ! -x "$TANSU" ]; then
      echo "== installing tansu 0.6.0 into $TOOLS (about 10 minutes)" >&2
      CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install tansu --version 0.6.0 --locked --features libsql --root "$TOOLS"
    fi
    dir=$(mktemp -d)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    (cd "$dir" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine sqlite://tansu.db) >"$dir/log" 2>&1 &
    broker=$!
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    url="kafka://127.0.0.1:$port"
  fi
  echo "== $bus: swimlane bench pipeline, then the peer on the same users" >&2
  cpu() { [ -n "$broker" ] && awk '{print $14 + $15}' "/proc/$broker/stat" || echo 0; }
  before=$(cpu)
  "$BIN" bench pipeline --bus "$url" --trainers "$TRAINERS" --users "$USERS" \
    --corrections "$CORRECTIONS" --paced "$PACED" --partitions "$PARTITIONS" --peer "$VENV/bin/python" --json >"$OUT/vs_ray_$bus.json"
  [ -n "$broker" ] && echo "  the broker used $(( ($(cpu) - before) / 100 )) CPU seconds over the whole run (every trainer count, the paced uploads and set-up)"
  "$VENV/bin/python" - "$OUT/vs_ray_$bus.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
p = r["peer"]
print(f"{r['bus']}: {r['users']} users x up to {r['corrections']} corrections, {r['cores']} cores")
print(f"  peer {p['peer']}: {p['users_per_core_min']} users retrained per core-minute "
      f"({p['seconds']} s, the median of rounds {p.get('rounds_seconds')})")
for x in r["runs"]:
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in x["burst_cpu_seconds"].items())
    print(f"  swimlane, {x['trainers']} trainer(s): {x['users_retrained_per_core_min']} users retrained "
          f"per core-minute ({x['settled_seconds']} s) = {x['over_peer']}x the peer; "
          f"paced overhead p50 {x['paced_overhead_p50_s']} s; burst CPU s: {cpu} ({x['cpu_ms_per_user']} ms a user)")
PY
  if [ -n "$broker" ]; then kill "$broker"; wait "$broker" 2>/dev/null || true; broker=""; rm -rf "$dir"; fi
done
