#!/usr/bin/env bash
# Same numbers before and after a change: run simulate, compare, sweep and capacity with fixed seeds on two
# versions of the code and diff their --json output (out_dir, the only field that names a path, set aside).
#
#   calib/experiments/before_after.sh BEFORE [AFTER]
#
# BEFORE and AFTER are git revisions, folders holding a copy of the code, or "worktree" for the checkout this
# script sits in (AFTER's default). A revision is extracted with git archive into a temporary folder; each
# version runs from its own folder (PYTHONPATH wins over an editable install). Prints one line per command and exits 1 if any output differs.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
before=${1:?usage: before_after.sh BEFORE [AFTER] (git revisions, or worktree)}
after=${2:-worktree}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tree() {  # tree REV DIR: the code of REV in DIR ("worktree": this checkout; a folder: itself)
    if [ "$1" = worktree ]; then echo "$root"; return; fi
    if [ -d "$1" ]; then (cd "$1" && pwd); return; fi
    mkdir -p "$2"
    git -C "$root" archive "$1" | tar -x -C "$2"
    echo "$2"
}

# name|arguments: every run is seeded; the default cost model is the bundled table profile
COMMANDS=(
    "simulate-default|simulate"
    "simulate-chunked-x2|simulate --policy chunked --instances 2 --seed 3"
    "simulate-roofline|simulate --policy continuous --cost h100-llama3-8b --arrival poisson --rate 40 --num-requests 300 --prompt-len uniform:64,2048 --output-len uniform:16,512 --seed 5"
    "simulate-linear-static|simulate --policy static --cost linear-default --arrival gamma --rate 2 --cv 2 --num-requests 150 --seed 7"
    "compare-default|compare"
    "compare-x2|compare --instances 2 --seed 1"
    "sweep|sweep --rates 0.5,1.5,3 --policies continuous,chunked,static --num-requests 120 --seed 2"
    "sweep-param|sweep --rates 1,2 --policies continuous --param max_num_seqs=4,16 --num-requests 100 --seed 4"
    "capacity|capacity --policies continuous,static --slo ttft=2,tpot=0.2 --num-requests 120 --max-runs 8 --seed 6"
)

run_all() {  # run_all DIR OUT: every command's JSON (out_dir dropped) in OUT/NAME.json
    mkdir -p "$2"
    for entry in "${COMMANDS[@]}"; do
        name=${entry%%|*}
        args=${entry#*|}
        # shellcheck disable=SC2086
        (cd "$1" && PYTHONPATH="$1" python -m sim.cli $args --json --no-plots --quiet --out "$work/out/$name") \
            > "$2/$name.raw" 2> "$2/$name.err" || echo "exit $?" >> "$2/$name.err"
        python - "$2/$name.raw" "$2/$name.json" <<'EOF'
import json, sys
def drop(x):
    if isinstance(x, dict):
        return {k: drop(v) for k, v in x.items() if k != "out_dir"}
    if isinstance(x, list):
        return [drop(v) for v in x]
    return x
try:
    doc = drop(json.load(open(sys.argv[1])))
except ValueError as exc:
    doc = {"not JSON": str(exc)}
json.dump(doc, open(sys.argv[2], "w"), indent=1, sort_keys=True)
EOF
    done
}

run_all "$(tree "$before" "$work/before")" "$work/a"
run_all "$(tree "$after" "$work/after")" "$work/b"

status=0
for entry in "${COMMANDS[@]}"; do
    name=${entry%%|*}
    if cmp -s "$work/a/$name.json" "$work/b/$name.json"; then
        echo "identical  $name ($(wc -c < "$work/a/$name.json") bytes of JSON)"
    else
        echo "DIFFERENT  $name"
        diff "$work/a/$name.json" "$work/b/$name.json" | head -20 || true
        status=1
    fi
    if [ -s "$work/a/$name.err" ] || [ -s "$work/b/$name.err" ]; then
        echo "  stderr: $(head -c 300 "$work/a/$name.err") | $(head -c 300 "$work/b/$name.err")"
    fi
done
echo "before: $before, after: $after"
exit $status
