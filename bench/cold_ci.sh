#!/usr/bin/env bash
# Times a cold `bash .ci/run`: a fresh clone of this checkout's HEAD, run with an empty
# HOME, so ~/.cache holds nothing (no tansu, no cargo target directory, no Python
# environments, no pip cache) and everything is built and installed anew. The Rust
# toolchain and cargo's download cache stay (CARGO_HOME, RUSTUP_HOME), as do installed
# Debian packages: on a bare machine add a minute or two for those.
#
#   bench/cold_ci.sh [WORKDIR]      # default WORKDIR: a new temporary directory
#
# Prints the exit status and the seconds taken; the log is WORKDIR/log. Needs the
# project's shared/ folder beside the checkout (the real swimmers' tests read it).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work/home"
git clone -q "$repo" "$work/repo"
if [ -d "$repo/../shared" ]; then ln -sfn "$(cd "$repo/../shared" && pwd)" "$work/shared"; fi
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
start=$(date +%s)
(cd "$work/repo" && env -i PATH="$cargo_home/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  HOME="$work/home" CARGO_HOME="$cargo_home" RUSTUP_HOME="$rustup_home" CI=true \
  bash .ci/run >"$work/log" 2>&1 </dev/null)
rc=$?
echo "cold bash .ci/run: exit $rc in $(($(date +%s) - start)) s (log: $work/log)"
exit "$rc"
