#!/usr/bin/env bash
# Runs the example programs with bad command-line options and bad data folders, and
# checks that each run exits non-zero with the expected message on stderr. The whole
# message must match for the programs' own option errors. Where the message comes from
# the library, a fixed substring must match, which names the file and line or the
# option and value.
#
# Usage: bash tests/badinput.sh DISTILL TRAIN
#   DISTILL, TRAIN   paths of the built examples/distill.c and examples/train.c
# Prints one line per failed case and "N passed, N failed" last; exits 1 on any failure.
set -u
if [ $# -ne 2 ] || [ ! -x "$1" ] || [ ! -x "$2" ]; then
    echo "usage: bash tests/badinput.sh DISTILL TRAIN (paths of the built examples)" >&2
    exit 2
fi
distill=$1
train=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

# A tiny task: 6 training and 2 dev sentences, and the options that keep a run short.
data=$work/data
mkdir -p "$data" "$work/no_dev" "$work/bad_label" "$work/big_label" "$work/dev_label" "$work/out" \
    "$work/cut_model" "$work/bad_vocab"
printf 'sentence\tlabel\ngood movie\t1\nbad movie\t0\ngreat fun\t1\ndull plot\t0\nfine acting\t1\nweak ending\t0\n' \
    >"$data/train.tsv"
printf 'sentence\tlabel\ngood fun\t1\nbad plot\t0\n' >"$data/dev.tsv"
cp "$data/train.tsv" "$work/no_dev/train.tsv"
printf 'sentence\tlabel\ngood movie\t1\nbad movie\tpositive\n' >"$work/bad_label/train.tsv"
cp "$data/dev.tsv" "$work/bad_label/dev.tsv"
printf 'sentence\tlabel\ngood movie\t1\nbad movie\t1000000\n' >"$work/big_label/train.tsv"
cp "$data/dev.tsv" "$work/big_label/dev.tsv"
cp "$data/train.tsv" "$work/dev_label/train.tsv"
mkdir -p "$work/one_label"
printf 'sentence\tlabel\ngood movie\t1\ngreat fun\t1\nfine acting\t1\nnice cast\t1\n' >"$work/one_label/train.tsv"
cp "$data/dev.tsv" "$work/one_label/dev.tsv"
: >"$work/a_file"
printf 'sentence\tlabel\ngood fun\t5\n' >"$work/dev_label/dev.tsv"
# A model folder whose weights file is cut to 3 bytes, and one whose vocab.txt lacks [MASK].
printf '{"hidden_size": 8, "num_attention_heads": 2}' >"$work/cut_model/config.json"
printf 'abc' >"$work/cut_model/model.safetensors"
printf '[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ngood\nbad\n' >"$work/cut_model/vocab.txt"
cp "$work/cut_model/config.json" "$work/cut_model/model.safetensors" "$work/bad_vocab/"
printf '[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n' >"$work/bad_vocab/vocab.txt"
tiny="--teacher-layers 2 --hidden 8 --heads 2 --ffn 8 --teacher-epochs 1 --student-epochs 1 --vocab-size 16 --proj-dim 4 \
    --negatives 2"

# Runs one case. $1: case name, $2: "exact" or "contains", $3: expected stderr (exact:
# the whole output; contains: a fixed substring), then the command.
run_case() {
    local name=$1 mode=$2 expected=$3 rc err
    shift 3
    "$@" >"$work/stdout.txt" 2>"$work/stderr.txt"
    rc=$?
    err=$(cat "$work/stderr.txt")
    if [ "$rc" -eq 0 ]; then
        failed=$((failed + 1))
        echo "FAIL $name: exit status 0, expected non-zero"
        return
    fi
    if [ "$rc" -gt 128 ]; then
        failed=$((failed + 1))
        echo "FAIL $name: killed by signal $((rc - 128))"
        return
    fi
    if { [ "$mode" = exact ] && [ "$err" != "$expected" ]; } ||
        { [ "$mode" = contains ] && ! grep -qF -- "$expected" "$work/stderr.txt"; }; then
        failed=$((failed + 1))
        echo "FAIL $name: stderr differs"
        echo "     expected ($mode): $expected"
        echo "     got:              $err"
        return
    fi
    passed=$((passed + 1))
}

# ---- distill: options out of range ----
run_case "distill --hidden 0" exact "distill: invalid value '0' for --hidden: expected an integer in [1, 65536]" \
    "$distill" --hidden 0
run_case "distill --hidden -32" exact "distill: invalid value '-32' for --hidden: expected an integer in [1, 65536]" \
    "$distill" --hidden -32
run_case "distill --heads 0" exact "distill: invalid value '0' for --heads: expected an integer in [1, 1024]" \
    "$distill" --heads 0
run_case "distill --heads 3 --hidden 32" exact "distill: --heads 3 does not divide --hidden 32" \
    "$distill" --heads 3 --hidden 32
run_case "distill --heads 64 --hidden 32" exact "distill: --heads 64 does not divide --hidden 32" \
    "$distill" --heads 64 --hidden 32
run_case "distill --ffn 0" exact "distill: invalid value '0' for --ffn: expected an integer in [1, 262144]" \
    "$distill" --ffn 0
run_case "distill --batch 0" exact "distill: invalid value '0' for --batch: expected an integer in [1, 65536]" \
    "$distill" --batch 0
run_case "distill --max-len 2" exact "distill: invalid value '2' for --max-len: expected an integer in [3, 4096]" \
    "$distill" --max-len 2
run_case "distill --vocab-size -1" exact \
    "distill: invalid value '-1' for --vocab-size: expected an integer in [16, 1000000]" "$distill" --vocab-size -1
run_case "distill --teacher-layers 0" exact \
    "distill: invalid value '0' for --teacher-layers: expected an integer in [1, 128]" "$distill" --teacher-layers 0
run_case "distill --student-layers -1" exact \
    "distill: invalid value '-1' for --student-layers: expected an integer in [0, 128]" "$distill" --student-layers -1
run_case "distill --teacher-epochs 0" exact \
    "distill: invalid value '0' for --teacher-epochs: expected an integer in [1, 200]" "$distill" --teacher-epochs 0
run_case "distill --negatives 0" exact \
    "distill: invalid value '0' for --negatives: expected an integer in [1, 1000000]" "$distill" --negatives 0
run_case "distill --proj-dim 0" exact "distill: invalid value '0' for --proj-dim: expected an integer in [1, 65536]" \
    "$distill" --proj-dim 0
run_case "distill --temperature 0" exact \
    "distill: invalid value '0' for --temperature: expected a number in [0.001, 1000]" "$distill" --temperature 0
run_case "distill --temperature nan" exact \
    "distill: invalid value 'nan' for --temperature: expected a number in [0.001, 1000]" "$distill" --temperature nan
run_case "distill --tau 0" exact "distill: invalid value '0' for --tau: expected a number in [0.001, 1000]" \
    "$distill" --tau 0
run_case "distill --lr 0" exact "distill: invalid value '0' for --lr: expected a number in [1e-08, 1]" \
    "$distill" --lr 0
run_case "distill --dropout 1" exact "distill: invalid value '1' for --dropout: expected a number in [0, 0.9]" \
    "$distill" --dropout 1
run_case "distill --momentum 1" exact "distill: invalid value '1' for --momentum: expected a number in [0, 0.999]" \
    "$distill" --momentum 1
run_case "distill --hidden 12abc" exact "distill: invalid value '12abc' for --hidden: expected an integer in [1, 65536]" \
    "$distill" --hidden 12abc
run_case "distill --hidden 99999999999999999999" exact \
    "distill: invalid value '99999999999999999999' for --hidden: expected an integer in [1, 65536]" \
    "$distill" --hidden 99999999999999999999
run_case "distill --hidden without a value" exact "distill: option --hidden needs a value (see --help)" \
    "$distill" --hidden
run_case "distill unknown option" exact "distill: unknown option --bogus (see --help)" "$distill" --bogus 1
run_case "distill --pooling max" exact "distill: invalid value 'max' for --pooling: expected first or mean" \
    "$distill" --pooling max

# ---- distill: files and data ----
run_case "distill missing data folder" exact \
    "distill: failed to open TSV file '$work/absent/train.tsv': No such file or directory; check the path" \
    "$distill" --data "$work/absent" --curves "$work/out/curves"
run_case "distill missing dev.tsv" contains "distill: failed to open TSV file '$work/no_dev/dev.tsv'" \
    "$distill" --data "$work/no_dev" --curves "$work/out/curves" $tiny
run_case "distill bad label in train.tsv" contains \
    "distill: $work/bad_label/train.tsv:3: invalid label 'positive'; labels must be integers >= 0" \
    "$distill" --data "$work/bad_label" --curves "$work/out/curves"
run_case "distill missing teacher folder" exact \
    "distill: failed to open vocabulary file '$work/absent/vocab.txt': No such file or directory; check the path" \
    "$distill" --data "$data" --teacher "$work/absent" --curves "$work/out/curves" $tiny
run_case "distill teacher vocab.txt without [MASK]" exact \
    "distill: $work/bad_vocab/vocab.txt: missing special token [MASK]; a BERT vocabulary must contain [PAD], [UNK], [CLS], [SEP] and [MASK], one per line" \
    "$distill" --data "$data" --teacher "$work/bad_vocab" --curves "$work/out/curves" $tiny
run_case "distill truncated teacher weights" exact \
    "distill: loading the teacher from $work/cut_model failed: $work/cut_model/model.safetensors: the file has 3 bytes, fewer than the 8-byte header length; it is truncated or is not a safetensors file" \
    "$distill" --data "$data" --teacher "$work/cut_model" --curves "$work/out/curves" $tiny
run_case "distill K larger than the data" exact "distill: --negatives 100 must be below the 6 training examples" \
    "$distill" --data "$data" --curves "$work/out/curves" $tiny --negatives 100
run_case "distill K equal to the data" exact "distill: --negatives 6 must be below the 6 training examples" \
    "$distill" --data "$data" --curves "$work/out/curves" $tiny --negatives 6
run_case "distill class id 1000000" exact \
    "distill: $work/big_label/train.tsv has class ids up to 1000000; ids must be 0..N-1 with N at most 10000" \
    "$distill" --data "$work/big_label" --curves "$work/out/curves" $tiny
run_case "distill dev class unseen in training" exact "distill: dev.tsv has label 5 but train.tsv only 0..1" \
    "$distill" --data "$work/dev_label" --curves "$work/out/curves" $tiny
run_case "distill on data with a single label" exact \
    "distill: every example in $work/one_label/train.tsv has label 1, so the contrastive loss has no negatives; give data with at least two classes, or --lambda 0" \
    "$distill" --data "$work/one_label" --curves "$work/out/curves" $tiny
run_case "distill --save-teacher into a file" exact \
    "distill: cannot write into the folder $work/a_file: Not a directory; give a writable folder" \
    "$distill" --data "$data" --save-teacher "$work/a_file" --curves "$work/out/curves" $tiny
run_case "distill --save-teacher with a missing parent" exact \
    "distill: cannot create the folder $work/absent/teacher: No such file or directory" \
    "$distill" --data "$data" --save-teacher "$work/absent/teacher" --curves "$work/out/curves" $tiny
run_case "distill curves in a missing folder" contains "distill: cannot write $work/absent/curves.csv" \
    "$distill" --data "$data" --curves "$work/absent/curves" $tiny

# ---- train: options out of range ----
run_case "train --hidden 0" exact "train: invalid value '0' for --hidden: expected an integer in [1, 65536]" \
    "$train" --hidden 0
run_case "train --heads 3 --hidden 32" exact "train: --heads 3 does not divide --hidden 32" \
    "$train" --heads 3 --hidden 32
run_case "train --layers 0" exact "train: invalid value '0' for --layers: expected an integer in [1, 128]" \
    "$train" --layers 0
run_case "train --ffn -1" exact "train: invalid value '-1' for --ffn: expected an integer in [1, 262144]" \
    "$train" --ffn -1
run_case "train --batch 0" exact "train: invalid value '0' for --batch: expected an integer in [1, 65536]" \
    "$train" --batch 0
run_case "train --micro-batch -1" exact "train: invalid value '-1' for --micro-batch: expected an integer in [0, 65536]" \
    "$train" --micro-batch -1
run_case "train --epochs 0" exact "train: invalid value '0' for --epochs: expected an integer in [1, 10000]" \
    "$train" --epochs 0
run_case "train --max-len -1" exact "train: invalid value '-1' for --max-len: expected an integer in [0, 4096]" \
    "$train" --max-len -1
run_case "train --lr 0" exact "train: invalid value '0' for --lr: expected a number in [1e-08, 1]" "$train" --lr 0
run_case "train --clip -1" exact "train: invalid value '-1' for --clip: expected a number in [0, 1e+06]" \
    "$train" --clip -1
run_case "train --dropout 0.95" exact "train: invalid value '0.95' for --dropout: expected a number in [0, 0.9]" \
    "$train" --dropout 0.95
run_case "train unknown option" exact "train: unknown option --bogus (see --help)" "$train" --bogus 1
run_case "train --out without a value" exact "train: option --out needs a value (see --help)" "$train" --out
run_case "train --out followed by an option" exact "train: option --out needs a value (see --help)" \
    "$train" --out --epochs 1

# ---- train: files and data ----
run_case "train missing data folder" exact \
    "train: failed to open TSV file '$work/absent/train.tsv': No such file or directory; check the path" \
    "$train" --data "$work/absent" --out "$work/out"
run_case "train missing dev.tsv" exact \
    "train: failed to open TSV file '$work/no_dev/dev.tsv': No such file or directory; check the path" \
    "$train" --data "$work/no_dev" --out "$work/out"
run_case "train bad label in train.tsv" exact \
    "train: $work/bad_label/train.tsv:3: invalid label 'positive'; labels must be integers >= 0" \
    "$train" --data "$work/bad_label" --out "$work/out"
run_case "train --max-len 1" exact \
    "train: invalid value '1' for --max-len: expected 0 or an integer in [3, 4096]" \
    "$train" --data "$data" --max-len 1 --out "$work/out"
run_case "train class id 1000000" exact \
    "train: $work/big_label/train.tsv has class ids up to 1000000; ids must be 0..N-1 with N at most 10000" \
    "$train" --data "$work/big_label" --out "$work/out"
run_case "train dev class unseen in training" exact \
    "train: $work/dev_label/dev.tsv has class 5 but train.tsv only 0..1" "$train" --data "$work/dev_label" --out "$work/out"
run_case "train --out with a missing parent" exact \
    "train: cannot create the folder $work/absent/model: No such file or directory" \
    "$train" --data "$data" --out "$work/absent/model"
run_case "train missing vocab.txt" exact \
    "train: vocabulary: failed to open vocabulary file '$work/absent.txt': No such file or directory; check the path" \
    "$train" --data "$data" --vocab "$work/absent.txt" --out "$work/out"
run_case "train missing --init folder" contains "failed to open vocabulary file '$work/absent/vocab.txt'" \
    "$train" --data "$data" --init "$work/absent" --out "$work/out"
run_case "train vocab.txt without [MASK]" exact \
    "train: vocabulary: $work/bad_vocab/vocab.txt: missing special token [MASK]; a BERT vocabulary must contain [PAD], [UNK], [CLS], [SEP] and [MASK], one per line" \
    "$train" --data "$data" --vocab "$work/bad_vocab/vocab.txt" --out "$work/out"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
