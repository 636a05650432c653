"""Where the bytes of a site's training reply go, object by object, as Flower 1.41 sends them.

Flower pushes a message as "inflatable" objects (record dict, records, arrays, array chunks),
each deflated once (see :func:`fedsafe.compression.wire.serialized_size`). This builds the
reply a site sends after a DP round (same records and metric keys as the ClientApp's, a
random update of the model's shape) for the MNIST CNN and the lending club MLP, and prints
each object's size, so the part no codec can shrink (the framing) is measured, not guessed.

    .venv/bin/python bench/reply_framing.py
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedsafe.compression import encode_update, parse_compression, serialized_size
from fedsafe.models import build_model

MODELS = (("mnist_cnn", 784, 5100), ("mlp", 65, 700))
CODECS = ("none", "int4", "rsign", "rvq", "rvq:bits=10")


def reply(model_name: str, width: int, examples: int, spec: str) -> RecordDict:
    """A training reply as fedsafe's ClientApp builds it."""
    model = build_model(model_name, width, 1)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    pipeline = parse_compression(spec)
    rng = np.random.default_rng(0)
    if pipeline.is_identity:
        arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in state.items()})
    else:
        update = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in state.items()}
        arrays, _ = encode_update(update, pipeline, rng, None)
    metrics = {
        "num-examples": examples, "epsilon": 2.9987, "run-epsilon": 2.9987, "delta": 1e-5,
        "steps": 25, "sample-rate": 0.0123, "noise-multiplier": 0.8887, "max-grad-norm": 1.0,
        "bytes-up": serialized_size(arrays),
    }  # fmt: skip
    return RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site-name": "site-003"}),
        }
    )


def main() -> int:
    print("| model | codec | total | record dict | metrics | site | array record + array "
          "+ chunk headers | payload | x fewer than none |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model_name, width, examples in MODELS:
        plain = serialized_size(reply(model_name, width, examples, "none"))
        for spec in CODECS:
            content = reply(model_name, width, examples, spec)
            sizes: dict[str, int] = defaultdict(int)
            payload = 0
            for obj in get_all_nested_objects(content).values():
                blob = obj.deflate()
                kind = type(obj).__name__
                sizes[kind] += len(blob)
                if kind == "ArrayChunk":
                    payload += len(obj.data)  # type: ignore[attr-defined]
            total = sum(sizes.values())
            framing = sizes["ArrayRecord"] + sizes["Array"] + sizes["ArrayChunk"] - payload
            print(
                f"| {model_name} | {spec} | {total:,} | {sizes['RecordDict']} | "
                f"{sizes['MetricRecord']} | {sizes['ConfigRecord']} | {framing:,} | "
                f"{payload:,} | {plain / total:.1f} |"
            )
        print(f"| {model_name} | 1/32 of none | {plain / 32:,.0f} | | | | | | 32.0 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
