#!/usr/bin/env bash
# Rebuilds every committed figure and table in bench/results from the committed traces alone, in a
# scratch folder, and compares them byte for byte with the committed files. A refactor that changes
# no behaviour leaves this silent except for "identical" lines; any difference fails (exit 1).
#   bash bench/reproduce.sh            (about 2 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's codestop, whatever is installed
R=bench/results
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
M=qwen2.5-coder-0.5b
T=gsm8k-$M.traces.jsonl
cp "$R/$T" "$W/"
B=$W/gsm8k-$M
python -m codestop.cli sweep "$W/$T" --method codestop,deer,consistency --tau 0.25:16:0.25 --out "$B.sweep" > /dev/null 2>&1
python -m codestop.cli calibrate "$W/$T" --max-accuracy-drop 0.01 --tau 0.25:16:0.25 --json > "$B.calibrate.json"
python -m codestop.cli plot dynamics "$W/$T" --out "$B.dynamics.png" > "$B.auroc.md" 2>/dev/null
python bench/compare.py "$W" > "$W/comparison.md" 2>/dev/null
# analysis.md quotes its own command line: run it with the committed paths, in a scratch copy of them
mkdir -p "$W/repo/$R"
for f in testbed-gsm8k-heldout-solve-then-check testbed-math500-solve-then-check testbed-gsm8k-heldout-chain-of-draft; do
  ln -s "$ROOT/$R/$f.traces.jsonl" "$W/repo/$R/"
done
(cd "$W/repo" && python "$ROOT/bench/testbed/analyze.py" "$R/testbed-gsm8k-heldout-solve-then-check.traces.jsonl" \
  --math "$R/testbed-math500-solve-then-check.traces.jsonl" \
  --cod "$R/testbed-gsm8k-heldout-chain-of-draft.traces.jsonl" \
  --probe-interval 1 --out "$R/testbed-heldout" > /dev/null 2>&1)
mv "$W/repo/$R/testbed-heldout" "$W/testbed-heldout"
status=0
for f in "$W"/gsm8k-$M.* "$W"/comparison.md "$W"/testbed-heldout/*; do
  rel=${f#"$W"/}
  [ "$rel" = "$T" ] && continue
  if [ ! -e "$R/$rel" ]; then
    echo "new (not committed): $rel"
  elif cmp -s "$f" "$R/$rel"; then
    echo "identical: $rel"
  else
    echo "DIFFERS: $rel"; status=1
  fi
done
exit $status
