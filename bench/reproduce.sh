#!/usr/bin/env bash
# Rebuilds every committed figure and table in bench/results from the committed traces alone, in a
# scratch folder, and compares them byte for byte with the committed files. A refactor that changes
# no behaviour leaves this silent except for "identical" lines; any difference fails (exit 1).
#   bash bench/reproduce.sh            (about 2 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
R=bench/results
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
M=qwen2.5-coder-0.5b
T=gsm8k-$M.traces.jsonl
cp "$R/$T" "$W/"
B=$W/gsm8k-$M
codestop sweep "$W/$T" --method codestop,deer,consistency --tau 0.25:16:0.25 --out "$B.sweep" > /dev/null 2>&1
codestop calibrate "$W/$T" --max-accuracy-drop 0.01 --tau 0.25:16:0.25 --json > "$B.calibrate.json"
codestop plot dynamics "$W/$T" --out "$B.dynamics.png" > "$B.auroc.md" 2>/dev/null
python bench/compare.py "$W" > "$W/comparison.md" 2>/dev/null
python bench/testbed/analyze.py "$R/testbed-gsm8k-heldout-solve-then-check.traces.jsonl" \
  --math "$R/testbed-math500-solve-then-check.traces.jsonl" \
  --cod "$R/testbed-gsm8k-heldout-chain-of-draft.traces.jsonl" \
  --probe-interval 1 --out "$W/testbed-heldout" > /dev/null 2>&1
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
