#!/usr/bin/env bash
# Runs bench/codec_error_sweep.py for several codec NMSEs and seeds in parallel on one GPU
# machine and gathers the results into $OUT/codec_error_sweep.json. Usage (device machine):
#   bash bench/run_sweep_on_gpu.sh "0 0.45 0.65 0.85 1.25" "1 2 3" 540
set -u
nmses=$1; seeds=$2; limit=${3:-540}
dir=$(mktemp -d)
nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS on" || echo "MPS off"
for w in $nmses; do for s in $seeds; do
  python3 -W ignore bench/codec_error_sweep.py --nmse "$w" --seed "$s" --device cuda \
    --json "$dir/w${w}_s${s}.json" > "$dir/w${w}_s${s}.log" 2>&1 &
done; done
end=$((SECONDS + limit))
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt $end ]; do sleep 5; done
python3 - "$dir" "${OUT:-.}/codec_error_sweep.json" <<'PY'
import json, pathlib, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))]
pathlib.Path(sys.argv[2]).write_text(json.dumps(rows, indent=1) + "\n")
for r in rows: print(f"w={r['nmse']} seed={r['seed']} acc={r['accuracy']:.4f} {r['seconds']:.0f}s")
PY
tail -n 3 "$dir"/*.log | grep -i error | head
