"""The deployment timeline parser, on log lines in the format Flower 1.41 writes at DEBUG."""

from __future__ import annotations

from datetime import datetime

import pytest

from fedsafe.transport.timeline import STEPS, phase_breakdown, site_episodes

# Trimmed from a real SuperNode log (FLWR_LOG_LEVEL=DEBUG): ANSI colours, uvicorn access lines
# and lines without a timestamp are interleaved with the ones the parser reads.
LOG = """\
\x1b[92mINFO \x1b[0m2026-11-22 11:23:53,102:      [RUN 1117736990059808277]
\x1b[92mINFO \x1b[0m2026-11-22 11:23:53,102:      Receiving: train message (ID: 4eca)
INFO 2026-11-22 11:23:53,238:      Received successfully
WARNING 2026-11-22 11:23:54,478:   DEBUG logs enabled. Do not use this in production.
INFO:     127.0.0.1:58928 - "POST /v1/runtime/acquire-task HTTP/1.1" 200 OK
INFO 2026-11-22 11:23:56,275:      Start `flwr-clientapp` process
DEBUG 2026-11-22 11:23:56,465:     Loading ClientApp `fedsafe.client.app:app`
DEBUG 2026-11-22 11:23:59,000:     fedsafe: train handler start
Successfully installed fedsafe to /tmp/site-0/apps/fedsafe.
DEBUG 2026-11-22 11:24:08,000:     fedsafe: train handler end
DEBUG 2026-11-22 11:24:08,365:     Runtime.PushMessages
INFO 2026-11-22 11:24:08,789:      Sending: train message (ID: 7a65)
INFO 2026-11-22 11:24:09,192:      Sent successfully
INFO 2026-11-22 11:24:15,284:      Receiving: evaluate message (ID: 23cc)
INFO 2026-11-22 11:24:18,667:      Start `flwr-clientapp` process
"""


def _t(clock: str) -> float:
    return datetime.strptime("2026-11-22 " + clock, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def test_episodes_follow_each_message():
    train, evaluate = site_episodes(LOG)
    assert train.kind == "train" and train.complete
    assert train.received == pytest.approx(_t("11:23:53.102"))
    assert train.process_start == pytest.approx(_t("11:23:56.275"))
    assert train.handler_start == pytest.approx(_t("11:23:59.000"))
    assert train.handler_end == pytest.approx(_t("11:24:08.000"))
    assert train.sending == pytest.approx(_t("11:24:08.789"))
    assert train.sent == pytest.approx(_t("11:24:09.192"))
    # The log ends while the evaluate message is still being handled.
    assert evaluate.kind == "evaluate" and not evaluate.complete


def test_phase_splits_along_the_slowest_site():
    fast = LOG.replace("11:24:08,789", "11:24:08,400").replace("11:24:09,192", "11:24:08,500")
    episodes = {"slow": site_episodes(LOG), "fast": site_episodes(fast)}
    sent_at, done_at = _t("11:23:50.000"), _t("11:24:09.400")
    phase = phase_breakdown("train", 1, sent_at, done_at, episodes)
    assert phase is not None and phase.critical_site == "slow"
    assert list(phase.steps_s) == list(STEPS)
    assert sum(phase.steps_s.values()) == pytest.approx(phase.wall_s)
    assert phase.steps_s["node_poll"] == pytest.approx(3.102, abs=1e-3)
    assert phase.steps_s["compute"] == pytest.approx(9.0, abs=1e-3)
    assert phase.steps_s["server_poll"] == pytest.approx(0.208, abs=1e-3)


def test_incomplete_phase_gives_none():
    episodes = {"site": site_episodes(LOG)}
    assert phase_breakdown("evaluate", 1, _t("11:24:10.0"), _t("11:24:30.0"), episodes) is None
    assert phase_breakdown("train", 1, _t("11:25:00.0"), _t("11:26:00.0"), episodes) is None


def test_launcher_logs_merge_into_the_supernodes_timeline(tmp_path):
    """With fedsafe's launcher the ClientApp's lines are in ``launcher.log``; merged by stamp."""
    from fedsafe.transport.timeline import read_site_logs

    supernode = "\n".join(
        line
        for line in LOG.splitlines()
        if "Receiving" in line or "Sending" in line or "Sent successfully" in line
    )
    launcher = (
        "fedsafe-launcher: zygote ready (pid 1, preloaded torch)\n"
        "INFO 2026-11-22 11:23:53,900: fedsafe-launcher: task process started\n"
        "DEBUG 2026-11-22 11:23:54,500:     fedsafe: train handler start\n"
        "DEBUG 2026-11-22 11:24:08,000:     fedsafe: train handler end\n"
    )
    (tmp_path / "supernode.log").write_text(supernode)
    (tmp_path / "launcher.log").write_text(launcher)
    episodes = read_site_logs({"site": [tmp_path / "supernode.log", tmp_path / "launcher.log"]})
    train = episodes["site"][0]
    assert train.complete
    assert train.process_start == pytest.approx(_t("11:23:53.900"))
    assert train.handler_start == pytest.approx(_t("11:23:54.500"))
    assert train.sending == pytest.approx(_t("11:24:08.789"))
    # The SuperNode's log alone has no ClientApp lines: the episode cannot be split.
    assert not read_site_logs({"site": tmp_path / "supernode.log"})["site"][0].complete
