"""site_mods(): fedsafe's app is built with it, and its order is what makes the guarantee."""

from __future__ import annotations

from fedsafe.client.app import app
from fedsafe.client.mods import (
    encode_update,
    errors_as_codes,
    ledger_commit,
    ledger_receipts,
    privacy_budget,
    release_check,
    site_mods,
    site_policy,
)
from fedsafe.client.site_errors import SiteErrorCode
from fedsafe.client.train_step import training_step
from fedsafe.privacy.ledger import SitePrivacyLedger
from tests.client.mods.conftest import Site, app_with, new_context, train_message


def test_fedsafe_app_is_built_with_the_site_mods_in_order() -> None:
    mods = site_mods()
    # The app wraps each mod for the optional phase profile (client/phase_profile.py), in order.
    assert [wrapper.mod for wrapper in app._mods] == mods
    assert mods[0] is errors_as_codes
    # The commit wraps the compression: the reply stored with the commit is the one that leaves.
    positions = [mods.index(m) for m in (site_policy, privacy_budget, ledger_commit, encode_update)]
    assert positions == sorted(positions)
    # Receipts: checked before the budget, added inside the release check.
    order = [mods.index(m) for m in (release_check, site_policy, ledger_receipts, privacy_budget)]
    assert order == sorted(order)


def test_a_ledger_commit_outside_the_budget_mod_sends_a_code_and_trains_nothing(
    site: Site,
) -> None:
    wrong = app_with([errors_as_codes, site_policy, ledger_commit, privacy_budget], training_step)
    reply = wrong(train_message(site.width()), new_context(site))
    assert reply.error.code == SiteErrorCode.INTERNAL
    assert not site.ledger.exists()


def test_the_step_without_the_mods_refuses_before_training(site: Site) -> None:
    bare = app_with([errors_as_codes], training_step)
    reply = bare(train_message(site.width()), new_context(site))
    assert reply.error.code == SiteErrorCode.INTERNAL
    assert not site.ledger.exists()
    # And with every mod but the ledger commit, the step refuses too: no uncommitted event.
    no_commit = app_with([m for m in site_mods() if m is not ledger_commit], training_step)
    reply = no_commit(train_message(site.width()), new_context(site))
    assert reply.error.code == SiteErrorCode.INTERNAL
    with SitePrivacyLedger.open(site.ledger) as ledger:
        assert ledger.entries() == []
