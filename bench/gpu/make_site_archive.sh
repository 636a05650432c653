#!/usr/bin/env bash
# Builds .gpuenv/site312.tar.xz: Flower, Ray, Opacus, dp-accounting, cryptography and their
# needs for the GPU machine's Python 3.12 (which has torch, numpy, pandas, scipy), at the
# versions of this checkout's .venv. Needs network to the package registry (here, not there).
# Ray's Java jars and RLlib are left out so that the archive and the repository fit the 64 MiB
# the device tool carries. Usage (repository root): bash bench/gpu/make_site_archive.sh
set -eu -o pipefail
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
names="ray flwr opacus dp-accounting cryptography iterators pycryptodome tomli tomli_w
grpcio-health-checking dm-tree alembic annotated-types cffi fastapi greenlet mako prompt-toolkit
pycparser pydantic pydantic-core sqlalchemy starlette typing-inspection wcwidth jsonschema
jsonschema-specifications referencing rpds-py protobuf grpcio typer rich pathspec packaging
certifi requests click uvicorn h11 anyio msgpack filelock pyyaml"
pins=$(for n in $names; do .venv/bin/python -c "import importlib.metadata as m; print('$n=='+m.version('$n'))"; done)
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$work/whl" $pins
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp $plat --target "$work/site" "$work"/whl/*.whl
rm -rf "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/llm"
find "$work/site" -name "*.map" -delete
find "$work/site" -name "__pycache__" -type d -prune -exec rm -rf {} +
mkdir -p .gpuenv && grep -qx "/.gpuenv/" .git/info/exclude 2>/dev/null || echo "/.gpuenv/" >> .git/info/exclude
tar cf - -C "$work/site" . | xz -6 > .gpuenv/site312.tar.xz
ls -la .gpuenv/site312.tar.xz
