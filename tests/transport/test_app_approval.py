"""What a site approves is what its launcher checks: the SHA-256 of the FAB bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedsafe.cli.main import main
from fedsafe.transport.app_approval import (
    approvals_path,
    digest_of,
    is_approved,
    launches,
    revoke,
)
from fedsafe.transport.approved_clientapp import append_jsonl
from fedsafe.transport.flower_app import write_app_folder
from fedsafe.transport.site_launcher import child_command, launch_task


def test_folder_digest_is_the_fab_flwr_run_sends(tmp_path: Path) -> None:
    one = write_app_folder(tmp_path / "one")
    two = write_app_folder(tmp_path / "two")
    sent = hashlib.sha256(build_fab_from_disk(two)).hexdigest()
    assert digest_of(one) == sent
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(two))
    assert digest_of(fab) == sent
    target = one / "fedsafe" / "client" / "app.py"
    target.write_bytes(target.read_bytes() + b"#")
    assert digest_of(one) != sent


def test_site_approve_cli_approve_revoke_and_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = write_app_folder(tmp_path / "app")
    work = tmp_path / "site"
    assert main(["site", "approve", str(app), "--workdir", str(work)]) == 0
    digest = digest_of(app)
    assert is_approved(work, digest)
    assert f"approved: sha256:{digest}" in capsys.readouterr().out
    assert main(["site", "approve", str(app), "--workdir", str(work)]) == 0
    assert "already approved" in capsys.readouterr().out
    assert oct(approvals_path(work).stat().st_mode & 0o777) == "0o600"
    append_jsonl(work / "app-launches.jsonl", {"sha256": digest, "decision": "refused"})
    assert main(["site", "apps", "--workdir", str(work)]) == 0
    assert "refused" in capsys.readouterr().out
    assert launches(work)[0]["decision"] == "refused"
    assert revoke(work, digest) and not is_approved(work, digest)
    assert not revoke(work, digest)


def test_site_approve_refuses_what_is_not_an_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["site", "approve", str(tmp_path / "nope"), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "APP" in err and "nope" in err
    (tmp_path / "folder").mkdir()
    assert main(["site", "approve", str(tmp_path / "folder"), "--workdir", str(tmp_path)]) == 2
    assert "pyproject.toml" in capsys.readouterr().err


def test_task_token_goes_by_stdin_never_on_the_command_line(tmp_path: Path) -> None:
    token = "tok-" + os.urandom(8).hex()
    command = child_command("127.0.0.1:1", tmp_path / "a.jsonl", tmp_path / "l.jsonl")
    assert token not in " ".join(command) and "--token" not in command
    out = tmp_path / "got"
    script = (
        "import sys, time, pathlib\n"
        f"pathlib.Path({str(out)!r}).write_text(sys.stdin.readline().strip())\n"
        "time.sleep(2)\n"
    )
    proc = launch_task(token, [sys.executable, "-c", script])
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert token.encode() not in cmdline
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.read_text() == token


def test_approved_bytes_are_installed_fresh_never_into_a_folder_that_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower's installer returns an existing ``apps/<pub>.<name>.<ver>.<hash[:8]>`` unchecked.

    A folder left there (an earlier install, a hand-edited copy, another app whose hash shares
    the first 8 hex digits) would be what runs, not the approved bytes the launcher hashed.
    """
    import tomllib

    from flwr.cli.install import install_from_fab

    from fedsafe.transport.approved_clientapp import install_approved, sha256_hex

    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    app = write_app_folder(tmp_path / "app")
    content = build_fab_from_disk(app)
    meta = tomllib.loads((app / "pyproject.toml").read_text())
    flwr_app = meta["tool"]["flwr"]["app"]
    name = f"{flwr_app['publisher']}.{meta['project']['name']}.{meta['project']['version']}"
    stale = home / "apps" / f"{name}.{sha256_hex(content)[:8]}"
    (stale / "fedsafe" / "client").mkdir(parents=True)
    (stale / "pyproject.toml").write_text((app / "pyproject.toml").read_text())
    (stale / "fedsafe" / "client" / "app.py").write_text("raise SystemExit('not approved')\n")
    # What the launcher called before: Flower hands back the stale folder as it is.
    assert Path(install_from_fab(content, skip_prompt=True)) == stale

    installed = again = install_approved(content, parent=tmp_path)
    try:
        assert installed.resolve() != stale.resolve() and home not in installed.parents
        ran = (installed / "fedsafe" / "client" / "app.py").read_bytes()
        assert ran == (app / "fedsafe" / "client" / "app.py").read_bytes()
        assert oct(installed.parent.parent.stat().st_mode & 0o777) == "0o700"
        again = install_approved(content, parent=tmp_path)
        assert again.parent.parent != installed.parent.parent  # a new folder per task
    finally:
        for path in (installed, again):
            shutil.rmtree(path.parent.parent, ignore_errors=True)


@pytest.mark.parametrize(
    "edit",
    [
        '{{"sha256": "{upper}", "revoked": true}}',  # a revocation the launcher never matches
        '{{"sha256": "sha256:{digest}"}}',  # pasted as `site approve` prints it
        '{{"sha256": "{digest}", "revoked": "yes"}}',
        "{digest}",
        '{{"sha256": "{digest}"',
    ],
)
def test_hand_edited_approvals_are_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: str
) -> None:
    from fedsafe.transport.approved_clientapp import approved_digests

    app = write_app_folder(tmp_path / "app")
    work = tmp_path / "site"
    assert main(["site", "approve", str(app), "--workdir", str(work)]) == 0
    digest = digest_of(app)
    with approvals_path(work).open("a") as out:
        out.write(edit.format(digest=digest, upper=digest.upper()) + "\n")
    capsys.readouterr()
    if "upper" in edit:  # what the admin meant to revoke would still run
        assert digest in approved_digests(approvals_path(work))
    for argv in (
        ["site", "apps", "--workdir", str(work)],
        ["site", "approve", str(app), "--workdir", str(work), "--revoke"],
        ["site", "approve", str(app), "--workdir", str(work)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "line 2" in err and str(approvals_path(work)) in err


def test_a_workdir_others_can_write_is_refused_a_new_one_is_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another local user who can write the folder could plant ``approved-apps.jsonl``."""
    app = write_app_folder(tmp_path / "app")
    fresh = tmp_path / "new" / "site"
    assert main(["site", "approve", str(app), "--workdir", str(fresh)]) == 0
    assert oct(fresh.stat().st_mode & 0o777) == "0o700"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    planted = {"sha256": "ab" * 32, "label": "planted by another user"}
    append_jsonl(approvals_path(shared), planted)
    capsys.readouterr()
    assert main(["site", "approve", str(app), "--workdir", str(shared)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chmod go-w" in err and str(shared) in err
    assert not is_approved(shared, digest_of(app))
