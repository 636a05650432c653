"""A simulated site's account follows its data source, not the run's partition of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context, MessageType, RecordDict

from fedsafe.client.app import app
from fedsafe.client.site import resolve_site
from fedsafe.config import RunConfig
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.ledger import SitePrivacyLedger, simulated_account
from fedsafe.protocol import FEDSAFE_RUN_ID
from fedsafe.tasks.scenarios import load_scenario
from tests.client.test_app import _message
from tests.client.test_app import task_identity as task_identity  # noqa: F401 (autouse)


def _mnist(ledgers: Path, sites: int, alpha: float, partition: int) -> Context:
    run: dict[str, Any] = {
        "scenario": "mnist", "mnist-sites": sites, "mnist-alpha": alpha,
        "ledger-dir": str(ledgers), "local-steps": 1, "batch-size": 16, "device": "cpu",
        "target-epsilon": 2.0, "target-delta": 1e-5, "num-server-rounds": 1,
    }  # fmt: skip
    nc = {"partition-id": partition, "num-partitions": sites}
    return Context(run_id=11, node_id=3, node_config=nc, state=RecordDict(), run_config=run)


def test_mnist_sites_under_any_partition_share_the_sources_account(tmp_path: Path) -> None:
    a, b = _mnist(tmp_path, 4, 0.5, 0), _mnist(tmp_path, 6, 0.1, 2)
    site_a = resolve_site(a, RunConfig.from_mapping(a.run_config))
    site_b = resolve_site(b, RunConfig.from_mapping(b.run_config))
    assert site_a.ledger_path == site_b.ledger_path == str(tmp_path / "mnist-source.sqlite")
    # Each site's stored releases stay its own; the data versions stay apart in the entries.
    assert site_a.releases_beside != site_b.releases_beside
    assert site_a.fingerprint != site_b.fingerprint


def test_heart_sites_keep_an_account_each(tmp_path: Path) -> None:
    run = {"scenario": "heart", "ledger-dir": str(tmp_path)}
    paths = {
        resolve_site(
            Context(
                run_id=1,
                node_id=1,
                node_config={"partition-id": i, "num-partitions": 4},
                state=RecordDict(),
                run_config=run,
            ),  # fmt: skip
            RunConfig.from_mapping(run),
        ).ledger_path
        for i in range(4)
    }
    assert len(paths) == 4
    # The same names the run folder's report reads the ledgers under.
    assert simulated_account("heart", "Cleveland") == "Cleveland"
    assert simulated_account("mnist", "mnist-3") == "mnist-source"


def test_another_partition_of_the_same_records_composes_onto_the_same_account(
    tmp_path: Path,
) -> None:
    replies = []
    for run_id, (sites, alpha, partition) in zip(
        ("1a" * 16, "2b" * 16), ((4, 0.5, 0), (6, 0.1, 2)), strict=True
    ):
        context = _mnist(tmp_path, sites, alpha, partition)
        width = load_scenario("mnist", mnist_count=sites, mnist_alpha=alpha).site(partition)
        msg = _message(MessageType.TRAIN, width.num_features, model="mnist_cnn")
        msg.content["config"][FEDSAFE_RUN_ID] = run_id
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        replies.append(reply.content.metric_records["metrics"])
    with SitePrivacyLedger.open(tmp_path / "mnist-source.sqlite") as ledger:
        entries = ledger.entries()
    assert [e.run_id for e in entries] == ["1a" * 16, "2b" * 16]
    composed = epsilon([e.event for e in entries], 1e-5, RunConfig.from_mapping({}).accountant)
    # The second run's site reports the lifetime of every release on the source, not a fresh 0.
    assert replies[1]["epsilon"] > replies[1]["run-epsilon"]
    assert abs(replies[1]["epsilon"] - composed) <= 1e-9 * composed
    assert list(tmp_path.glob("*.sqlite")) == [tmp_path / "mnist-source.sqlite"]
