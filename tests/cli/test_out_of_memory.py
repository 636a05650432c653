"""An accountant out of memory outside calibration's search: one line, no traceback (17e).

``calibration._search`` counts a MemoryError as over the target, but ``privacy plan`` then
composes the planned rounds again (the per-round schedule), where an out-of-memory PRV grid
(seen under ``ulimit -v 1500000`` at ``--epsilon 1000``) leaked a traceback.
"""

import fedsafe.cli.privacy as cli_privacy
from fedsafe.cli.main import main


def test_out_of_memory_in_privacy_plan_is_one_line(monkeypatch, capsys):
    def out_of_memory(*_args, **_kwargs):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(cli_privacy, "plan_noise", out_of_memory)
    rc = main(
        ["privacy", "plan", "--epsilon", "1000", "--delta", "1e-5", "--rounds", "50",
         "--steps", "200", "--batch-size", "64", "--n", "1000"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    assert err.startswith("fedsafe: error: out of memory") and err.count("\n") == 1
