#!/usr/bin/env bash
# Runs the fuzz targets (tests/fuzz) with cargo-fuzz on nightly. Not part of tests/run.sh: the
# suite replays what the fuzzers found (tests/fuzz/regressions) on stable instead.
#
#   tests/fuzz.sh                 # every target: decoders to 10 million runs, session 20 minutes
#   tests/fuzz.sh update 60       # one target for 60 seconds
#   tests/fuzz.sh frame 600 -runs=10000000   # ...with more libFuzzer options
#
# Each target starts from its regressions directory plus a working corpus kept in
# target/fuzz-corpus/<target>. A crash is written to tests/fuzz/artifacts/<target>/: copy it into
# tests/fuzz/regressions/<target>/ with a name saying what it is once it is fixed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/tests/fuzz"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "tests/fuzz.sh needs the nightly toolchain (rustup toolchain install nightly); stopping." >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "tests/fuzz.sh needs cargo-fuzz (cargo install cargo-fuzz); stopping." >&2
  exit 2
fi
run() {
  local target="$1"; shift
  local corpus="$root/target/fuzz-corpus/$target"
  mkdir -p "$corpus" "artifacts/$target"
  echo "==> $target $*" >&2
  # -O: optimized without debug assertions, as the engine ships (yrs debug-asserts on 64-bit
  # client ids, which a release build truncates to 53 bits as Yjs does).
  cargo +nightly fuzz run -O "$target" "$corpus" "regressions/$target" -- \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1 "$@"
}
if [ $# -ge 1 ]; then
  target="$1"; secs="${2:-60}"; shift; [ $# -ge 1 ] && shift
  run "$target" -max_total_time="$secs" "$@"
  exit 0
fi
for target in frame update awareness; do
  run "$target" -runs=10000000 -max_len=65536
done
run session -max_total_time=1200 -max_len=4096
