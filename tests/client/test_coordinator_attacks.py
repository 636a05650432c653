"""Attacks on the real ClientApp that got through a review (issue 10), kept as regressions.

Each test plays the curious coordinator (it chooses the global model and the run config) or
the careless site admin against a real deployed site: CSV, schema, policy file and SQLite
ledger on disk, the ClientApp called with the Message and Context a SuperNode hands it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsafe.client import site as site_module
from fedsafe.client.app import app
from fedsafe.client.policy import SitePolicy
from fedsafe.client.site_errors import SiteErrorCode
from fedsafe.models import build_model
from tests.client.test_app import RUN, Site, _context, _message, site, task_identity

__all__ = ["site", "task_identity"]  # fixtures re-used from test_app (one autouse)


def _train_message(state: dict[str, torch.Tensor]) -> Message:
    content = RecordDict(
        {"config": ConfigRecord({"server-round": 1}), "arrays": ArrayRecord(state)}
    )
    msg = Message(content, dst_node_id=3, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _released_values(reply: Message) -> np.ndarray:
    assert not reply.has_error(), reply.error
    arrays = reply.content.array_records["arrays"]
    return np.concatenate([a.numpy().ravel() for a in arrays.values()])


def _one_59_year_old(site: Site, keep: bool) -> None:
    """Keep exactly one training-eligible row aged 59 (scaled age exactly 0), or none."""
    lines = site.data.read_text().splitlines()
    rows = [line for line in lines[1:] if line.split(",")[1] != "59"]
    if keep:
        rows.append("999,59,yes,yes")
    site.data.write_text("\n".join([lines[0], *rows]) + "\n")


@pytest.mark.parametrize("mode", ["auto", "ghost", "hooks", "bookkeeping"])
@pytest.mark.parametrize("keep", [True, False], ids=["with the record", "without it"])
def test_a_global_model_with_an_infinite_weight_reveals_no_membership_bit(
    tmp_path: Path, keep: bool, mode: str
) -> None:
    """An infinite age weight makes ``inf * 0`` (NaN) the logit of a record aged exactly 59.

    Before the fix its NaN gradient passed through Opacus's clipping (NaN clip factor) into
    the noisy sum, and the released model was NaN exactly when such a record was sampled: the
    coordinator learnt whether the site holds a 59-year-old, whatever the noise.
    """
    site = Site(tmp_path / "site", rows=200)
    _one_59_year_old(site, keep)
    width = site.width()
    state = build_model("logreg", width, 42).state_dict()
    weight = next(k for k in state if k.endswith("weight"))
    state = {k: torch.zeros_like(v) for k, v in state.items()}
    state[weight][0, 0] = math.inf  # the age column, scaled onto [-1, 1]: 59 -> 0.0
    # Every record sampled in every step (batch >= public size): the record is always used.
    # Ghost clipping holds no per-record gradient to zero: a deployed site never uses it,
    # whatever the run config asks.
    run = {
        **RUN, "local-steps": 5, "batch-size": 200, "num-server-rounds": 1,
        "grad-sample-mode": mode,
    }  # fmt: skip
    reply = app(_train_message(state), _context(site.node_config, run))
    values = _released_values(reply)
    # The infinite weight stays infinite (post-processing of what was sent); nothing is NaN.
    assert not np.isnan(values).any()
    assert np.isinf(values).sum() == 1


def test_a_tiny_clipping_norm_is_refused_before_training(site: Site) -> None:
    """Opacus clips in float32: a norm of 7.1e-46 clips records to 1.4e-45, twice the norm.

    The noise is scaled to the norm asked for, so the coordinator would halve the noise in
    effect while the ledger accounted the full noise multiplier.
    """
    width = site.width()
    for norm in (7.1e-46, 1e-45, 1e-30, 1e30, math.inf):
        reply = app(
            _message(MessageType.TRAIN, width),
            _context(site.node_config, {**RUN, "max-grad-norm": norm}),
        )
        assert reply.has_error()
        assert reply.error.code == SiteErrorCode.RUN_CONFIG
    assert site.ledger_bytes() == b""


def test_editing_the_sites_files_does_not_reset_its_lifetime_budget(tmp_path: Path) -> None:
    """A careless admin adds a comment to the schema (or a row to the CSV).

    The ledger account was a digest of the data and schema bytes, so any edit opened a fresh
    account with the whole lifetime budget on the same records.
    """
    site = Site(tmp_path / "site")
    policy = SitePolicy.for_records(
        160, public_size=90, min_records=20, max_rounds=5, max_local_steps=20,
        budget_epsilon=0.6, max_run_epsilon=0.6,
    )  # fmt: skip
    site.policy_path.write_text(policy.to_toml())
    width = site.width()

    def run_once(run_id: int) -> dict[str, float]:
        context = Context(
            run_id=run_id, node_id=3, node_config=site.node_config, state=RecordDict(),
            run_config={**RUN, "num-server-rounds": 1, "target-epsilon": 0.5},
        )  # fmt: skip
        reply = app(_message(MessageType.TRAIN, width), context)
        assert not reply.has_error(), reply.error
        return dict(reply.content.metric_records["metrics"])  # type: ignore[arg-type]

    spent = [run_once(100 + i) for i in range(3)]
    assert "budget-exhausted" not in spent[0]
    assert spent[-1].get("budget-exhausted") == 1
    before = site.ledger_bytes()
    site.schema.write_text(site.schema.read_text() + "# reviewed by the data steward\n")
    with site.data.open("a") as f:
        f.write("5000,44,no,yes\n")
    site_module._custom_site.cache_clear()  # a new ClientApp process reads the files afresh
    after = run_once(200)
    assert after.get("budget-exhausted") == 1
    assert after["epsilon"] == pytest.approx(spent[-1]["epsilon"])
    assert site.ledger_bytes() == before
