"""Site mods against the inline train handler before them: same replies, time ratio per round.

Issue 12 (client side) moved the train handler's refusals, budget, ledger commit, compression
and release check into Flower mods around one training step. This loads ``fedsafe/client/app.py``
as it was before (``--base``, from git, into a temporary module; its imports resolve against the
current package, whose parts it calls) next to the current app, gives each its own copy of one
deployed site (CSV, schema, policy file, SQLite ledger), and sends both the same train messages,
interleaved, alternating which goes first: it checks the replies carry the same keys and
privacy figures, and reports the median and the fastest time per train message and their ratios
``mods / inline``, for plain and compressed (int8) updates (on a shared machine, the fastest
is the steadier figure).

    .venv/bin/python bench/site_mods.py [--base 4ad29cd] [--repeats 15]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedsafe.client.app import app as mods_app
from fedsafe.client.policy import SitePolicy
from fedsafe.data.schema import load_site_data
from fedsafe.models import build_model

SCHEMA = """label: {column: outcome, positive: yes}
drop: [patient_id]
features:
  age: {type: numeric, range: [18, 100], source: "years, adult patients"}
  smoker: {type: categorical, categories: [no, yes]}
"""
FIGURES = ("num-examples", "noise-multiplier", "sample-rate", "steps", "delta", "epsilon")


def _old_app(base: str) -> ClientApp:
    text = subprocess.run(
        ["git", "show", f"{base}:fedsafe/client/app.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "inline_app.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("inline_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app  # type: ignore[no-any-return]


def _site(root: Path, rows: int = 400) -> dict[str, Any]:
    root.mkdir(parents=True)
    lines = ["patient_id,age,smoker,outcome"]
    lines += [f"{i},{30 + i % 40},{'yes' if i % 3 else 'no'},{'yes' if i % 2 else 'no'}"
              for i in range(rows)]  # fmt: skip
    (root / "site.csv").write_text("\n".join(lines) + "\n")
    (root / "schema.yaml").write_text(SCHEMA)
    policy = SitePolicy.for_records(rows, budget_epsilon=1e6, max_run_epsilon=1e6, max_rounds=1000)
    (root / "policy.toml").write_text(policy.to_toml())
    return {
        "site-name": "hospital-a",
        "data-path": str(root / "site.csv"),
        "schema-path": str(root / "schema.yaml"),
        "ledger-path": str(root / "ledger.sqlite"),
        "policy-path": str(root / "policy.toml"),
        "device": "cpu",
    }


def _message(width: int) -> Message:
    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": 1}),
            "arrays": ArrayRecord(build_model("logreg", width, 42).state_dict()),
        }
    )
    msg = Message(content, dst_node_id=3, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _timed(app: ClientApp, node_config: dict[str, Any], run: dict[str, Any], width: int):
    context = Context(11, 3, node_config, RecordDict(), run)
    start = time.perf_counter()
    reply = app(_message(width), context)
    elapsed = time.perf_counter() - start
    assert not reply.has_error(), reply.error
    return elapsed, reply


def main(argv: list[str] | None = None) -> int:
    """Time both apps side by side and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="4ad29cd")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    apps = {"inline": _old_app(args.base), "mods": mods_app}
    root = Path(tempfile.mkdtemp())
    sites = {name: _site(root / name) for name in apps}
    width = load_site_data("w", sites["mods"]["data-path"], sites["mods"]["schema-path"])
    print(f"train message, deployed site, 400 records, logreg; base {args.base}")
    print(f"{'compression':<12} {'statistic':<9} {'inline ms':>10} {'mods ms':>10} {'ratio':>6}")
    for compression in ("none", "int8"):
        run = {"scenario": "custom", "local-steps": 3, "batch-size": 8, "num-server-rounds": 5,
               "noise-multiplier": 2.0, "compression": compression}  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in apps}
        for i in range(args.repeats + 1):
            replies = {}
            # Alternate which app goes first, so neither always pays for the other's leftovers.
            for name in sorted(apps, reverse=bool(i % 2)):
                elapsed, replies[name] = _timed(apps[name], sites[name], run, width.num_features)
                if i:  # the first round of each pays imports and caches
                    times[name].append(elapsed)
            inline, mods = (replies[n].content.metric_records["metrics"] for n in apps)
            assert set(inline) == set(mods), (set(inline), set(mods))
            assert all(inline[k] == mods[k] for k in FIGURES), (dict(inline), dict(mods))
        for label, stat in (("median", statistics.median), ("fastest", min)):
            ms = {name: stat(t) * 1000 for name, t in times.items()}
            print(f"{compression:<12} {label:<9} {ms['inline']:>10.1f} {ms['mods']:>10.1f} "
                  f"{ms['mods'] / ms['inline']:>6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
