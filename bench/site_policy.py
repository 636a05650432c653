"""What the site's policy costs: the checks per reply, and the public size's price in epsilon.

Two ratios, measured side by side in one run:

1. Time of a deployed site's train handler (the real ClientApp on a real CSV, schema, policy
   file and ledger; the policy is read, the run config checked, the reply checked key by key)
   against the time of the same checks alone. The checks' share of a round is their ratio.
2. For each heart site at a fixed noise multiplier, the epsilon of a 15-round run with the
   Poisson rate of its public size (rounded down to 2 significant digits) against the rate of
   its exact size: what rounding costs in privacy.

    .venv/bin/python bench/site_policy.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedsafe.client.app import app  # noqa: E402
from fedsafe.client.policy import (  # noqa: E402
    SitePolicy,
    load_policy,
    policy_refusal,
    public_size_of,
    run_request,
    size_refusal,
)
from fedsafe.compression.wire import WIRE_KEY  # noqa: E402
from fedsafe.config import RunConfig  # noqa: E402
from fedsafe.data.heart import load_heart_sites  # noqa: E402
from fedsafe.models import build_model  # noqa: E402
from fedsafe.privacy.accounting import epsilon  # noqa: E402
from fedsafe.privacy.events import PoissonGaussianEvent  # noqa: E402
from fedsafe.privacy.releases import check_reply  # noqa: E402
from fedsafe.training.dp_training import poisson_sample_rate  # noqa: E402

SCHEMA = """label: {column: outcome, positive: yes}
drop: [patient_id]
features:
  age: {type: numeric, range: [18, 100], source: "years, adult patients"}
  smoker: {type: categorical, categories: [no, yes]}
"""
RUN = {"scenario": "custom", "local-steps": 10, "batch-size": 4, "num-server-rounds": 100}


def _site(root: Path) -> dict[str, str]:
    data, schema, policy = root / "site.csv", root / "schema.yaml", root / "policy.toml"
    data.write_text(
        "patient_id,age,smoker,outcome\n"
        + "".join(
            f"{i},{30 + i % 40},{'yes' if i % 3 else 'no'},{'yes' if i % 2 else 'no'}\n"
            for i in range(310)
        )
    )
    schema.write_text(SCHEMA)
    policy.write_text(SitePolicy.for_records(198, max_run_epsilon=3.0).to_toml())
    return {
        "site-name": "bench",
        "data-path": str(data),
        "schema-path": str(schema),
        "policy-path": str(policy),
        "ledger-path": str(root / "ledger.sqlite"),
        "device": "cpu",
    }


def _message(width: int, rnd: int) -> Message:
    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": rnd}),
            "arrays": ArrayRecord(build_model("logreg", width, 42).state_dict()),
        }
    )
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def check_cost(rounds: int) -> tuple[float, float]:
    """Median seconds of a train handler, and of its policy and release checks alone."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        node = _site(Path(tmp))
        context = Context(1, 1, node, RecordDict(), RUN)
        handler, checks = [], []
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            reply = app(_message(2, rnd), context)
            handler.append(time.perf_counter() - t0)
            assert not reply.has_error(), reply.error
            t0 = time.perf_counter()
            policy = load_policy(node["policy-path"])
            policy_refusal(policy, run_request(RunConfig.from_mapping(RUN)))
            size_refusal(policy, 198, 2)
            check_reply(reply.content, ("0.weight", "0.bias", WIRE_KEY))
            checks.append(time.perf_counter() - t0)
    return statistics.median(handler), statistics.median(checks)


def rounding_cost(sigma: float = 1.0, rounds: int = 15, steps: int = 10) -> list[dict]:
    """Per heart site: epsilon with the public size's rate over epsilon with the exact rate."""
    rows = []
    for site in load_heart_sites():
        n = len(site.x_train)
        public = public_size_of(n)
        eps = {}
        for label, size in (("eps_exact", n), ("eps_public", public)):
            q = poisson_sample_rate(size, 4)
            eps[label] = epsilon([PoissonGaussianEvent(q, sigma, rounds * steps)], 1e-4)
        rows.append({"site": site.name, "n": n, "public": public, **eps})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="train handler calls to time")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    handler, checks = check_cost(args.rounds)
    print(f"train handler {handler * 1e3:.1f} ms, policy + release checks {checks * 1e3:.2f} ms")
    print(f"checks / handler: {checks / handler:.4f}")
    print("\nsite               n  public  eps exact  eps public  ratio")
    for r in rounding_cost():
        print(
            f"{r['site']:<15} {r['n']:>4}  {r['public']:>6}  {r['eps_exact']:>9.3f}  "
            f"{r['eps_public']:>10.3f}  {r['eps_public'] / r['eps_exact']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
