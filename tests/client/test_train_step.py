"""A ClientApp written outside fedsafe, with fedsafe's mods and step, answers as fedsafe's own.

The app below is built here, not in :mod:`fedsafe.client.app`, the way a site's own developer
would (README, "Site mods"). Two identical sites on disk, one behind each app, get the same
messages: the ledgers must hold the same entries and every refusal must be the same reply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from fedsafe.client import training_step
from fedsafe.client.app import app as fedsafe_app
from fedsafe.client.mods import site_mods
from fedsafe.client.policy import SitePolicy
from fedsafe.privacy.ledger import SitePrivacyLedger
from tests.client.test_app import RUN, Site, _context, _message, task_identity  # noqa: F401

outside_app = ClientApp(mods=site_mods())


@outside_app.train()
def _train(msg: Message, context: Context) -> Message:
    return training_step(msg, context)


def _as_site(site: Site) -> None:
    """Use this site's own ledger-secrets folder: two sites of one name are two machines."""
    folder = site.ledger.parent
    os.environ["FEDSAFE_LEDGER_SECRETS"] = str(folder.parent / "secrets" / folder.name)


def _ledger_entries(site: Site) -> list[tuple[Any, ...]]:
    """Each entry's content, without its time and hashes (which differ by when it was written)."""
    if not site.ledger.exists():
        return []
    _as_site(site)
    with SitePrivacyLedger.open(site.ledger) as ledger:
        return [
            (e.seq, e.run_id, e.round, e.event, e.clip_norm, e.delta, e.epsilon_after, e.accountant)
            for e in ledger.entries()
        ]


def _content(reply: Message) -> dict[str, dict[str, Any]]:
    assert not reply.has_error(), reply.error
    # The receipt's head is the MAC of each site's own ledger (its own ids and times): not compared.
    return {
        name: {k: v for k, v in record.items() if k != "receipt-head"}
        for name, record in reply.content.items()
        if name not in reply.content.array_records
    }


def _same_answers(
    tmp_path: Path, calls: list[tuple[dict[str, Any], int]], **policy: Any
) -> list[dict[str, dict[str, Any]]]:
    """Send each (run overrides, round) to both apps; one context per distinct run, per site."""
    sites = [Site(tmp_path / name) for name in ("fedsafe", "outside")]
    for site in sites:
        site.policy = SitePolicy.for_records(160, **policy)
        site.policy_path.write_text(site.policy.to_toml())
    width = sites[0].width()
    contexts: dict[tuple[int, str], Context] = {}
    answers = []
    for run, server_round in calls:
        replies = []
        for i, (app, site) in enumerate(zip((fedsafe_app, outside_app), sites, strict=True)):
            key = (i, repr(sorted(run.items())))
            if key not in contexts:
                # A distinct run is a distinct Flower run: its ledger entries are its own.
                contexts[key] = _context(site.node_config, {**RUN, **run})
                contexts[key].run_id = 11 + len({k[1] for k in contexts})
            context = contexts[key]
            _as_site(site)
            replies.append(app(_message(MessageType.TRAIN, width, server_round), context))
        a, b = (_content(r) for r in replies)
        # Epsilon, noise, steps, refusals: equal; the models differ only by their secret noise.
        assert a == b
        assert ("arrays" in replies[0].content) == ("arrays" in replies[1].content)
        answers.append(a)
    assert _ledger_entries(sites[0]) == _ledger_entries(sites[1])
    assert _ledger_entries(sites[0])
    return answers


POLICY = {"public_size": 90, "min_records": 20, "max_rounds": 5, "max_local_steps": 20}


def _refused(answer: dict[str, dict[str, Any]]) -> str:
    return str(answer["site"].get("refused-setting", ""))


def test_same_ledger_and_same_refusals_over_a_run(tmp_path: Path) -> None:
    answers = _same_answers(
        tmp_path,
        [
            ({}, 1),
            ({}, 2),
            ({}, 3),  # beyond the run's 2 rounds
            ({"noise-multiplier": 0.1}, 1),  # less noise than the policy allows
            ({"local-steps": 500}, 1),
            ({"dp": False}, 1),
            ({"reproducible-noise": True, "seed": 7}, 1),
        ],
        **POLICY,
    )
    assert [_refused(a) for a in answers] == [
        "",
        "",
        "num-server-rounds",
        "noise-multiplier",
        "local-steps",
        "dp",
        "reproducible-noise",
    ]


def test_same_budget_exhausted_reply(tmp_path: Path) -> None:
    # Two runs on one lifetime budget (5 rounds at sigma 1.5: epsilon 0.71 of 0.9; 10: 1.01):
    # the second run finds it spent.
    run = {"noise-multiplier": 1.5, "target-epsilon": 0.9, "num-server-rounds": 5}
    runs = [{**run, "seed": s} for s in (1, 2)]
    answers = _same_answers(
        tmp_path,
        [(r, n) for r in runs for n in range(1, 6)],
        **POLICY,
        budget_epsilon=0.9,
        max_run_epsilon=0.9,
    )
    exhausted = ["budget-exhausted" in a["metrics"] for a in answers]
    assert exhausted[:5] == [False] * 5 and exhausted[-1]
