"""The task process: approved bytes are what loads; zygote forks share no generator state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedsafe.transport import approved_clientapp
from fedsafe.transport.approved_clientapp import preload, read_token, read_token_into
from fedsafe.transport.flower_app import write_app_folder
from fedsafe.transport.site_launcher import child_command

SCRIPT = str(Path(approved_clientapp.__file__).resolve())


def _run_as_launcher_child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in ``python -I`` with approved_clientapp.py loaded by path, as it is run."""
    prelude = (
        "import runpy, sys\n"
        f"ns = runpy.run_path({SCRIPT!r}, run_name='approved_clientapp')\n"
        "sys.modules['approved_clientapp_ns'] = type(sys)('ns')\n"
        "sys.modules['approved_clientapp_ns'].__dict__.update(ns)\n"
        "from approved_clientapp_ns import *\n"
    )
    return subprocess.run(
        [sys.executable, "-I", "-c", prelude + code], capture_output=True, text=True, timeout=300
    )


def test_the_app_loads_from_the_approved_bytes_not_from_a_package_imported_before(
    tmp_path: Path,
) -> None:
    """The task process imports ``fedsafe.strict_json`` (the site's installed fedsafe) before
    the check; Flower's ``load_app`` reuses ``sys.modules``, so without forgetting those
    modules the site's copy would run instead of the bytes whose hash was approved."""
    app = write_app_folder(tmp_path / "app")
    marker = "APPROVED_BYTES_" + os.urandom(4).hex()
    client = app / "fedsafe" / "client" / "app.py"
    client.write_text(client.read_text() + f"\n{marker} = True\n")
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(app))
    code = (
        "from pathlib import Path\n"
        "from flwr.supercore.object_ref import load_app\n"
        f"installed = install_approved(Path({str(fab)!r}).read_bytes(), "
        f"parent=Path({str(tmp_path)!r}))\n"
        "forget = sys.argv[-1] == 'forget'\n"
        "assert 'fedsafe' in sys.modules  # imported by the task process itself\n"
        "dropped = forget_modules(app_top_level_names(installed)) if forget else []\n"
        "load_app('fedsafe.client.app:app', ValueError, installed)\n"
        "module = sys.modules['fedsafe.client.app']\n"
        f"print(json.dumps([module.__file__, hasattr(module, {marker!r}), dropped]))\n"
    )
    results = {}
    for mode in ("forget", "keep"):
        out = _run_as_launcher_child(
            code.replace("sys.argv[-1] == 'forget'", f"{mode == 'forget'!r}")
        )
        assert out.returncode == 0, out.stderr
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    loaded_file, has_marker, dropped = results["forget"]
    assert has_marker and Path(loaded_file).is_relative_to(tmp_path)
    assert "fedsafe" in dropped and "fedsafe.strict_json" in dropped
    # What the launcher did before: the site's installed fedsafe ran, not the approved bytes.
    assert results["keep"][1] is False


def test_the_zygote_preloads_libraries_never_the_app_and_holds_no_secure_generator() -> None:
    with pytest.raises(ValueError, match="must not import the app"):
        preload(("numpy", "fedsafe.privacy.secure_random"))
    out = _run_as_launcher_child(
        "loaded = preload()\n"
        "mods = sorted(m for m in sys.modules if m.split('.')[0] == 'fedsafe')\n"
        "print(json.dumps([loaded, mods]))\n"
    )
    assert out.returncode == 0, out.stderr
    loaded, fedsafe_modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"torch", "opacus", "numpy", "flwr.clientapp"} <= set(loaded)
    # Only the list reader the task process uses; no privacy module, so no generator to fork.
    assert fedsafe_modules == ["fedsafe", "fedsafe.strict_json"]


def test_forked_task_processes_draw_different_randomness() -> None:
    """Two forks of one preloaded zygote: the secure generator each keys after the fork, and
    numpy's and torch's global generators once reseeded, all differ between siblings."""
    code = (
        "preload(('numpy', 'torch'))\n"
        "import numpy as np, torch\n"
        "np.random.rand(); torch.rand(1)  # the global states exist before the forks\n"
        "def child(reseed):\n"
        "    r, w = os.pipe()\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os.close(r)\n"
        "        if reseed:\n"
        "            reseed_global_generators()\n"
        "        from fedsafe.privacy.secure_random import ChaCha20Random\n"
        "        draws = [ChaCha20Random().standard_normal(4).tolist(),\n"
        "                 np.random.rand(4).tolist(), torch.rand(4).tolist()]\n"
        "        os.write(w, json.dumps(draws).encode())\n"
        "        os._exit(0)\n"
        "    os.close(w)\n"
        "    data = b''\n"
        "    while chunk := os.read(r, 65536):\n"
        "        data += chunk\n"
        "    os.waitpid(pid, 0)\n"
        "    return json.loads(data)\n"
        "print(json.dumps([child(True), child(True), child(False), child(False)]))\n"
    )
    out = _run_as_launcher_child(code)
    assert out.returncode == 0, out.stderr
    one, two, plain_one, plain_two = json.loads(out.stdout.strip().splitlines()[-1])
    assert one[0] != two[0]  # secure noise: keyed from os.urandom in each child
    assert one[1] != two[1] and one[2] != two[2]  # reseeded global generators
    # The control: forks that skip the reseed inherit the zygote's numpy and torch streams.
    assert plain_one[1] == plain_two[1] and plain_one[2] == plain_two[2]
    assert plain_one[0] != plain_two[0]


def test_a_token_is_read_into_one_buffer_that_the_zygote_can_wipe() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"abcdef\nxy\n" + b"z" * 9 + b"\n")
        buffer = bytearray(8)
        assert read_token_into(buffer, r) == 6 and bytes(buffer[:6]) == b"abcdef"
        buffer[:6] = bytes(6)  # what serve_zygote does after each fork
        assert read_token_into(buffer, r) == 2 and bytes(buffer) == b"xy" + bytes(6)
        with pytest.raises(ValueError, match="too long"):
            read_token_into(buffer, r)
    finally:
        os.close(r)
        os.close(w)


def test_a_token_is_read_alone_later_ones_stay_in_the_pipe() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"first-token\nsecond-token\n")
        assert read_token(r) == "first-token"
        assert os.read(r, 100) == b"second-token\n"  # nothing of it was buffered here
        os.close(w)
        w = -1
        assert read_token(r) is None
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_the_zygote_process_starts_preloaded_and_exits_when_its_launcher_goes(
    tmp_path: Path,
) -> None:
    command = child_command(
        "127.0.0.1:1", tmp_path / "approved.jsonl", tmp_path / "launches.jsonl", zygote=True
    )
    assert command[1] == "-I" and command[-1] == "--zygote"
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline().decode()
        preloaded = first.split("preloaded", 1)[1]
        assert "zygote ready" in first and "torch" in preloaded and "fedsafe" not in preloaded
        proc.stdin.close()  # the launcher's end of the pipe closes when it exits
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_launcher_replaces_a_zygote_that_died(tmp_path: Path) -> None:
    """A stand-in zygote (a real process that records the tokens it reads) is killed between
    two tasks; the next token starts a new one instead of failing the launcher."""
    import signal

    from fedsafe.transport.site_launcher import Zygote

    got = tmp_path / "tokens"
    script = (
        "import os, sys\n"
        f"out = open({str(got)!r}, 'a')\n"
        "for line in sys.stdin:\n"
        "    out.write(f'{os.getpid()} {line}'); out.flush()\n"
    )
    zygote = Zygote([sys.executable, "-c", script])
    try:
        assert zygote.launch("first")
        first = zygote._proc
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        assert zygote.launch("second")
        second = zygote._proc
        assert second is not None and second.pid != first.pid
    finally:
        zygote.close()
        for proc in (first, second):
            proc.wait(timeout=30)
    lines = got.read_text().splitlines()
    assert lines[-1] == f"{second.pid} second"
