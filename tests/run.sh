#!/usr/bin/env bash
# Runs every test of codir.h: the unit tests (optimized, then under AddressSanitizer and
# UndefinedBehaviorSanitizer, then without OpenMP), the header build checks and a short
# run of the main example. Prints "N passed, N failed" last and exits non-zero on any
# failure. Needs only a C compiler (cc, or $CC) and a C++ compiler (c++, or $CXX).
#
# Usage: bash tests/run.sh            from the repository root or anywhere else
set -u
cd "$(dirname "$0")/.."
CC=${CC:-cc}
CXX=${CXX:-c++}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
passed=0
failed=0

# Records one check: its name, then the command that must succeed.
check() {
    local name=$1
    shift
    if "$@" >"$build/out.txt" 2>&1; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
        tail -n 30 "$build/out.txt" | sed 's/^/     /'
    fi
}

# Runs a unit-test binary, adding its "N passed, N failed" line to the totals.
run_suite() {
    local name=$1
    shift
    local line p f
    echo "== $name"
    "$@" 2>&1 | tee "$build/suite.txt" | grep -E '^(FAIL|failed:)' | head -n 60
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$build/suite.txt" | tail -n 1)
    if [ -z "$line" ]; then
        echo "FAIL $name: the test binary crashed or printed no summary"
        tail -n 20 "$build/suite.txt" | sed 's/^/     /'
        failed=$((failed + 1))
        return
    fi
    p=${line%% passed*}
    f=${line#*, }
    f=${f%% failed*}
    echo "     $line"
    passed=$((passed + p))
    failed=$((failed + f))
}

warn="-std=c11 -Wall -Wextra -Wpedantic -Wshadow -Werror"
srcs="tests/main.c tests/test_*.c"

echo "== header builds"
check "C11 strict warnings" $CC $warn -O2 -fopenmp -c tests/main.c -o "$build/main.o"
check "C++ build" $CXX -x c++ -std=c++17 -O2 -Wall -Wextra -Werror -fopenmp -c tests/main.c -o "$build/main_cpp.o"
printf '#include "../codir.h"\nint other_unit(void) { return codir_last_error()[0]; }\n' >"$build/two.c"
cp "$build/two.c" tests/.two_tu_tmp.c
check "two translation units link" sh -c "$CC $warn -O1 -c tests/.two_tu_tmp.c -o $build/two.o &&
    $CC $warn -O1 -fopenmp -c examples/distill.c -o $build/one.o && $CC $build/one.o $build/two.o -o $build/linked -fopenmp -lm"
rm -f tests/.two_tu_tmp.c
printf '#define CODIR_STATIC\n#define CODIR_IMPLEMENTATION\n#include "../codir.h"\nint main(void) { codir_config c = codir_config_default(); return codir_config_check(&c); }\n' >tests/.static_tmp.c
check "CODIR_STATIC exports nothing" sh -c "$CC -std=c11 -Wall -Wextra -Wpedantic -Werror -O1 -c tests/.static_tmp.c -o $build/static.o &&
    ! nm $build/static.o | grep -E ' [TDB] codir_'"
rm -f tests/.static_tmp.c
printf '#define CODIR_MALLOC(n) malloc(n)\n#define CODIR_IMPLEMENTATION\n#include "../codir.h"\n' >tests/.alloc_tmp.c
check "partial allocator override is an error naming the missing macros" sh -c "! $CC -std=c11 -c tests/.alloc_tmp.c -o $build/alloc.o 2>$build/alloc.err &&
    grep -q 'CODIR_REALLOC is missing' $build/alloc.err && grep -q 'CODIR_FREE is missing' $build/alloc.err"
rm -f tests/.alloc_tmp.c
check "allocator override counts no leak" sh -c "$CC -std=c11 -O1 -fopenmp tests/alloc_count.c -o $build/alloc_count -lm && $build/alloc_count"
check "every allocation failure is reported" sh -c "$CC -std=c11 -O1 -g -Wno-unknown-pragmas \
    -fsanitize=address,undefined -fno-sanitize-recover=undefined tests/alloc_fail.c -o $build/alloc_fail -lm && $build/alloc_fail"
printf 'int main(void) { return 0; }\n' >"$build/fast.c"
check "-ffast-math is rejected" sh -c "! $CC -ffast-math -include codir.h -c $build/fast.c -o $build/fast.o 2>$build/fast.err &&
    grep -q 'CODIR_ALLOW_FAST_MATH' $build/fast.err"

# Runs the unit tests whose names contain each of the given strings, in the binary $1;
# fails unless every string matched at least one test and none failed.
run_filtered() {
    local binary=$1 filter line
    shift
    for filter in "$@"; do
        line=$(OMP_NUM_THREADS=2 "$binary" "$filter" 2>&1 | tail -n 1)
        case $line in
            "0 passed"*) echo "no test matches '$filter'"; return 1 ;;
            *" 0 failed") ;;
            *) echo "'$filter': $line"; return 1 ;;
        esac
    done
}
# With -ffast-math the NaN and Inf checks are off, but the vector math must stay
# accurate: the compiler may reassociate, so rounding tricks would be folded away.
check "-ffast-math build with CODIR_ALLOW_FAST_MATH" sh -c "$CC -std=c11 -O2 -fopenmp -ffast-math \
    -DCODIR_ALLOW_FAST_MATH $srcs -o $build/tests_fast -lm"
check "-ffast-math GELU and attention tests pass" run_filtered "$build/tests_fast" "kernel gelu forward" \
    "kernel gelu backward" "kernel attention forward" "kernel attention backward" "kernel attention large"

echo "== unit tests (-O2 -fopenmp)"
if $CC -std=c11 -O2 -fopenmp $srcs -o "$build/tests" -lm 2>"$build/cc.txt"; then
    run_suite "unit tests" env OMP_NUM_THREADS=2 "$build/tests"
else
    failed=$((failed + 1)); echo "FAIL unit tests do not compile"; head -n 30 "$build/cc.txt"
fi

echo "== unit tests (-fsanitize=address,undefined)"
if $CC -std=c11 -O1 -g -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=undefined $srcs \
    -o "$build/tests_asan" -lm 2>"$build/cc.txt"; then
    run_suite "sanitized unit tests" env OMP_NUM_THREADS=2 ASAN_OPTIONS=detect_leaks=1 "$build/tests_asan"
else
    failed=$((failed + 1)); echo "FAIL sanitized unit tests do not compile"; head -n 30 "$build/cc.txt"
fi

echo "== unit tests (no OpenMP, scalar GEMM)"
if $CC -std=c11 -O2 -DCODIR_NO_SIMD -Wno-unknown-pragmas $srcs -o "$build/tests_serial" -lm 2>"$build/cc.txt"; then
    run_suite "serial unit tests" "$build/tests_serial"
else
    failed=$((failed + 1)); echo "FAIL serial unit tests do not compile"; head -n 30 "$build/cc.txt"
fi

echo "== main example"
check "distill --help" sh -c "$CC -std=c11 -O2 -fopenmp examples/distill.c -o $build/distill -lm && $build/distill --help | grep -q -- --lambda"
check "distill rejects a bad option" sh -c "! $build/distill --heads 3 --hidden 32 2>$build/err.txt && grep -q 'does not divide' $build/err.txt"
check "distill rejects a missing data folder" sh -c "! $build/distill --data /nonexistent 2>$build/err.txt && grep -q '/nonexistent/train.tsv' $build/err.txt"
check "distill end to end, tiny" sh -c "$build/distill --teacher-layers 2 --hidden 32 --heads 2 --ffn 64 --vocab-size 600 \
    --teacher-epochs 1 --student-epochs 1 --negatives 16 --proj-dim 16 --curves $build/curves >$build/distill.txt &&
    grep -c '^result model=' $build/distill.txt | grep -qx 5 && test -s $build/curves.csv && grep -q '</svg>' $build/curves.svg"

echo "== pre-training example"
check "pretrain builds" $CC -std=c11 -O2 -fopenmp examples/pretrain.c -o "$build/pretrain" -lm
check "pretrain end to end, tiny, and reload" sh -c "$build/pretrain --max-segments 64 --teacher-layers 2 --hidden 32 \
    --heads 2 --ffn 64 --teacher-epochs 1 --student-epochs 1 --vocab-size 500 --negatives 4 --proj-dim 16 \
    --teacher-out $build/pt_teacher --student-out $build/pt_student >$build/pretrain.txt &&
    grep -q '^result model=student' $build/pretrain.txt && test -s $build/pt_student/model.safetensors &&
    $build/pretrain --teacher $build/pt_teacher --max-segments 64 --student-layers 1 --hidden 32 --heads 2 --ffn 64 \
    --student-epochs 1 --negatives 4 --proj-dim 16 --student-out $build/pt_student2 >$build/pretrain2.txt &&
    grep -q '^result model=student' $build/pretrain2.txt"
mkdir -p "$build/short_dev"
cp examples/data/austen-persuasion/train.txt "$build/short_dev/train.txt"
# Two CJK characters that the vocabulary of the English text maps to [UNK].
printf '\346\274\242\345\255\227\n' >"$build/short_dev/dev.txt"
check "pretrain rejects a dev.txt with nothing to score" sh -c "! $build/pretrain --corpus $build/short_dev \
    --max-segments 64 --teacher-layers 2 --hidden 32 --heads 2 --ffn 64 --vocab-size 500 \
    --teacher-out $build/pt_t3 --student-out $build/pt_s3 >/dev/null 2>$build/err.txt &&
    grep -q 'short_dev/dev.txt cannot be scored: no segment has a token to predict' $build/err.txt"

echo "== fine-tuning example"
check "train builds" $CC -std=c11 -O2 -fopenmp examples/train.c -o "$build/train" -lm
mkdir -p "$build/pairs_model" "$build/pairs_again" "$build/sts_model"
check "train on sentence pairs, save, reload" sh -c "$build/train --data tests/fixtures/tasks/sentiment-pairs --epochs 1 \
    --layers 1 --hidden 32 --heads 2 --ffn 64 --vocab-size 800 --out $build/pairs_model >$build/train.txt &&
    grep -q 'accuracy=' $build/train.txt && test -s $build/pairs_model/model.safetensors &&
    $build/train --data tests/fixtures/tasks/sentiment-pairs --epochs 1 --init $build/pairs_model --out $build/pairs_again \
    >$build/train2.txt && grep -q 'saved=' $build/train2.txt"
check "train on a regression task" sh -c "$build/train --data tests/fixtures/tasks/overlap-sts --epochs 1 --layers 1 \
    --hidden 32 --heads 2 --ffn 64 --vocab-size 800 --out $build/sts_model >$build/train3.txt && grep -q 'pearson=' $build/train3.txt"

# The model folder's files must reach the disk before they replace the old ones:
# strace shows an fsync of the temporary file between its creation and its rename.
if command -v strace >/dev/null 2>&1; then
    mkdir -p "$build/sync_model"
    check "saved files are fsynced before the rename" sh -c "strace -f -o $build/strace.txt -e trace=openat,fsync,rename \
        $build/train --data tests/fixtures/tasks/overlap-sts --epochs 1 --layers 1 --hidden 32 --heads 2 --ffn 64 \
        --vocab-size 800 --out $build/sync_model >/dev/null &&
        awk '/openat.*model[.]safetensors[.]tmp/ { opened = 1 } opened && /fsync[(]/ { synced = 1 }
             /rename[(].*model[.]safetensors[.]tmp/ { ok = opened && synced } END { exit !ok }' $build/strace.txt"
else
    echo "skip saved files are fsynced before the rename: strace is not installed"
fi
# A failed fsync must report the error and keep the previous model folder intact.
if [ "$(uname -s)" = Linux ]; then
    cp -r "$build/sts_model" "$build/sync_before"
    cp -r "$build/sts_model" "$build/sync_target"
    check "a failed fsync keeps the old model folder" sh -c "$CC -std=c11 -shared -fPIC tests/fsync_fail.c \
        -o $build/fsync_fail.so && ! LD_PRELOAD=$build/fsync_fail.so $build/train --data tests/fixtures/tasks/overlap-sts \
        --epochs 1 --layers 1 --hidden 32 --heads 2 --ffn 64 --vocab-size 800 --seed 9 --out $build/sync_target \
        >/dev/null 2>$build/sync_err.txt && grep -q 'failed to sync' $build/sync_err.txt &&
        diff -r $build/sync_before $build/sync_target"
fi

echo "== bad input to the examples"
if $CC -std=c11 -O1 -g -fopenmp -fsanitize=address,undefined examples/distill.c -o "$build/distill_asan" -lm 2>"$build/cc.txt" &&
    $CC -std=c11 -O1 -g -fopenmp -fsanitize=address,undefined examples/train.c -o "$build/train_asan" -lm 2>>"$build/cc.txt"; then
    run_suite "bad input catalogue" bash tests/badinput.sh "$build/distill_asan" "$build/train_asan"
else
    failed=$((failed + 1)); echo "FAIL sanitized examples do not compile"; head -n 30 "$build/cc.txt"
fi

echo "== fuzzing (${CODIR_FUZZ_SECONDS:-60} s per harness when clang and libFuzzer are installed)"
bash tests/fuzz/run.sh "${CODIR_FUZZ_SECONDS:-60}" >"$build/fuzz.txt" 2>&1
fuzz_status=$?
cat "$build/fuzz.txt"
if grep -q '^skipped' "$build/fuzz.txt"; then
    :
elif [ $fuzz_status -eq 0 ]; then
    passed=$((passed + 1))
else
    failed=$((failed + 1))
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
