#!/usr/bin/env bash
# The CUDA federation of issue 17 on a GPU machine without network (bench/gpu_federation.py).
# The machine's python3 has torch with CUDA; Flower, Ray, Opacus, dp-accounting and their
# needs travel as one archive of a Python 3.12 site folder (.gpuenv/site312.tar.xz, made from
# the same pinned wheels the Makefile installs: bench/gpu/make_site_archive.sh). Usage there:
#   bash bench/gpu/run_on_device.sh "$OUT"
set -u -o pipefail
out=${1:-/tmp/gpu-out}
mkdir -p "$out" /tmp/site
[ -f /tmp/site/.done ] || { tar xJf .gpuenv/site312.tar.xz -C /tmp/site && touch /tmp/site/.done; }
py=$(python3 -c 'import sys; print(sys.executable)')
for f in /tmp/site/bin/*; do sed -i "1s|^#!.*python.*\$|#!$py|" "$f"; done
export PATH=/tmp/site/bin:$(dirname "$py"):$PATH PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FEDSAFE_DATA_DIR=$PWD/fedsafe/data/files FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0
python3 - <<'PY' 2>&1 | tee "$out/versions.txt" || exit 3
import importlib.metadata as m, torch, flwr, ray, opacus, dp_accounting, fedsafe, cryptography
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print(*(f"{n} {m.version(n)}" for n in ("flwr", "ray", "opacus", "dp-accounting", "cryptography",
                                          "numpy", "pandas", "grpcio", "protobuf")))
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 bench/gpu_federation.py --json "$out/gpu_federation.json" --runs-dir /tmp/gpu-runs "${@:2}" \
  2>&1 | tee "$out/gpu_federation.log"
# the sites' and coordinator's logs of a failed run
for d in /tmp/gpu-runs/*/; do n=$(basename "$d"); tail -c 4000 "$d/stderr.log" > "$out/$n.stderr.txt" 2>/dev/null; done
ls "$out"
