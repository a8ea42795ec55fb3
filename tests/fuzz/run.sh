#!/usr/bin/env bash
# Builds the libFuzzer harnesses of this folder with clang and runs each one for a
# bounded time, starting from its seed corpus in tests/fuzz/corpus/NAME. Prints one
# summary line per harness and exits 1 if any harness crashed, leaked, hung or failed
# to build. Prints "skipped: ..." and exits 0 when clang or libFuzzer is missing.
#
# Usage: bash tests/fuzz/run.sh [SECONDS] [HARNESS...]
#   SECONDS   run time of each harness (default 60)
#   HARNESS   any of fuzz_tsv fuzz_tokenizer fuzz_safetensors (default all three)
# Environment: CLANG (default clang); FUZZ_JOBS=2 runs two harnesses at a time;
# FUZZ_CORPUS=DIR keeps the inputs each harness finds in DIR/NAME (created if
# missing) so that a later run continues from them, instead of a temporary folder.
#
# A crash leaves the input that caused it, and the build, in a folder that the
# summary line names. Running the harness binary on that input reproduces it.
set -u
cd "$(dirname "$0")/../.."
clang=${CLANG:-clang}
seconds=${1:-60}
shift $(( $# > 0 ? 1 : 0 ))
harnesses=${*:-fuzz_tsv fuzz_tokenizer fuzz_safetensors}
jobs=${FUZZ_JOBS:-1}
# libFuzzer reads -max_total_time=0 as "no limit", so 0 is rejected here.
case $seconds in
    ''|*[!0-9]*|0) echo "tests/fuzz/run.sh: SECONDS must be a whole number of seconds >= 1, not '$seconds'" >&2; exit 2 ;;
esac

if ! command -v "$clang" >/dev/null 2>&1; then
    echo "skipped: $clang not found; install clang with libFuzzer (Debian: apt-get install clang) to run the fuzzers"
    exit 0
fi
work=$(mktemp -d)
printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
    >"$work/probe.c"
if ! "$clang" -fsanitize=fuzzer,address,undefined "$work/probe.c" -o "$work/probe" >"$work/probe.txt" 2>&1; then
    echo "skipped: $clang cannot link -fsanitize=fuzzer,address,undefined (libFuzzer or a sanitizer runtime is missing):"
    head -n 3 "$work/probe.txt" | sed 's/^/    /'
    rm -rf "$work"
    exit 0
fi

# Builds and runs one harness, writes its summary line to $work/NAME.summary, and
# returns non-zero on any failure.
fuzz_one() {
    local name=$1 dir=$work/$1 corpus log runs cov units
    mkdir -p "$dir/tmp" "$dir/artifacts"
    if [ -n "${FUZZ_CORPUS:-}" ]; then corpus=$FUZZ_CORPUS/$name; else corpus=$dir/corpus; fi
    mkdir -p "$corpus"
    if ! "$clang" -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
        -Wall -Wextra -Wno-unknown-pragmas "tests/fuzz/$name.c" -o "$dir/$name" -lm >"$dir/build.txt" 2>&1; then
        echo "$name: FAIL: the harness does not build; see $dir/build.txt" >"$work/$name.summary"
        return 1
    fi
    log=$dir/log.txt
    TMPDIR=$dir/tmp "$dir/$name" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$dir/artifacts/" "$corpus" "tests/fuzz/corpus/${name#fuzz_}" >"$log" 2>&1
    local rc=$?
    runs=$(grep -o 'number_of_executed_units: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$')
    units=$(ls "$corpus" | wc -l)
    if [ "$rc" -eq 0 ]; then
        echo "$name: ok, ${runs:-?} runs in $seconds s, ${cov:-?} coverage points, corpus of $units inputs" \
            >"$work/$name.summary"
        return 0
    fi
    {
        echo "$name: FAIL (exit $rc) after ${runs:-?} runs: $(grep -m 1 -E 'ERROR|fuzz: |runtime error|Timeout|out-of-memory' "$log")"
        echo "    input: $(ls "$dir"/artifacts/* 2>/dev/null | head -n 1); log: $log"
        echo "    reproduce: $dir/$name INPUT"
    } >"$work/$name.summary"
    return 1
}

failed=0
running=0
for name in $harnesses; do
    if [ ! -f "tests/fuzz/$name.c" ]; then
        echo "$name: FAIL: no tests/fuzz/$name.c" >"$work/$name.summary"
        failed=1
        continue
    fi
    fuzz_one "$name" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done

for name in $harnesses; do cat "$work/$name.summary"; done
if [ "$failed" -eq 0 ]; then
    rm -rf "$work"
else
    echo "kept the builds, logs and failing inputs in $work"
fi
exit "$failed"
