"""The codec registry against the code before it: same bytes, encode and decode time ratios.

Issue 16 moved every codec into its own module behind a registry and made the decoder check
each declared size against the model's layout. This loads the compression package as it was
before (``--base``, from git, into a temporary folder) next to the current one, encodes an
MNIST-CNN-sized update (25,826 values in 8 tensors) with every codec with the same generator
seed in both, checks the payloads are byte-identical, and times encoding and decoding side by
side, interleaved, reporting ``new / old`` (the median of ``--repeats`` runs each).

    .venv/bin/python bench/codec_registry.py [--base 4f89b8c] [--repeats 15]
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from fedsafe.compression import decode_update, encode_update, layout_of, parse_compression

SPECS = ["float16", "int8", "int4:chunk=256", "sign", "topk:0.01+int8", "randk:0.1+int8"]
SPECS += ["rsign", "rsign:keep=0.5", "rvq"]
#: The MNIST CNN's tensors (25,826 values).
SHAPES = {
    "conv1.weight": (16, 1, 5, 5),
    "conv1.bias": (16,),
    "conv2.weight": (32, 16, 5, 5),
    "conv2.bias": (32,),
    "fc1.weight": (24, 512),
    "fc1.bias": (24,),
    "fc2.weight": (10, 24),
    "fc2.bias": (10,),
}
FILES = ["errors.py", "compression/"]


def load_old(base: str, folder: Path) -> ModuleType:
    """``fedsafe.compression`` at ``base``, importable as ``fedsafe_old.compression``."""
    root = Path(__file__).resolve().parents[1]
    package = folder / "fedsafe_old"
    for item in FILES:
        listing = subprocess.run(
            ["git", "-C", str(root), "ls-tree", "-r", "--name-only", base, f"fedsafe/{item}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        for name in listing:
            text = subprocess.run(
                ["git", "-C", str(root), "show", f"{base}:{name}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            target = package / Path(name).relative_to("fedsafe")
            target.parent.mkdir(parents=True, exist_ok=True)
            # Only the imports: the wire key and stype ("fedsafe.compressed") stay as they are.
            text = text.replace("from fedsafe.", "from fedsafe_old.")
            target.write_text(text.replace("import fedsafe.", "import fedsafe_old."))
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    return importlib.import_module("fedsafe_old.compression")


def _median_ms(call: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    """Print one row per codec: identical bytes, and new/old time for encode and decode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="4f89b8c", help="git revision before the registry")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    update = {k: (0.01 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
    layout = layout_of(update)
    with tempfile.TemporaryDirectory() as folder:
        old = load_old(args.base, Path(folder))
        print(f"{'codec':16} {'bytes':>7} same  encode new/old  decode new/old")
        for spec in SPECS:
            new_pipeline = parse_compression(spec)
            old_pipeline = old.parse_compression(spec)
            new_record, stats = encode_update(update, new_pipeline, np.random.default_rng(1))
            old_record, _ = old.encode_update(update, old_pipeline, np.random.default_rng(1))
            key = "fedsafe.compressed"
            same = bytes(new_record[key].data) == bytes(old_record[key].data)
            ratios = []
            for new_call, old_call in (
                (
                    partial(encode_update, update, new_pipeline, np.random.default_rng(1)),
                    partial(old.encode_update, update, old_pipeline, np.random.default_rng(1)),
                ),
                (
                    partial(decode_update, new_record, layout),
                    partial(old.decode_update, old_record, layout),
                ),
            ):
                new_ms, old_ms = [], []
                for _ in range(5):  # interleaved, so drift on a shared machine hits both
                    new_ms.append(_median_ms(new_call, args.repeats))
                    old_ms.append(_median_ms(old_call, args.repeats))
                ratios.append(min(new_ms) / min(old_ms))
            print(
                f"{spec:16} {stats.encoded_bytes:7d} {'yes' if same else 'NO':4}"
                f"  {ratios[0]:14.2f}  {ratios[1]:14.2f}"
            )


if __name__ == "__main__":
    main()
