"""Site resolution helpers: the scenario fingerprint hashes the shipped file once per process."""

from __future__ import annotations

import hashlib

from fedsafe.client.site import _scenario_fingerprint, _shipped_file_digest
from fedsafe.data.locate import data_file


def test_fingerprint_is_the_hash_of_the_file_then_scenario_site_and_partition() -> None:
    expected = hashlib.sha256(data_file("mnist.npz").read_bytes())
    expected.update(b"|mnist|site-3|alpha=0.5")
    assert _scenario_fingerprint("mnist", "site-3", "alpha=0.5") == expected.hexdigest()
    # Many sites per worker (50-site simulations): every one is still told apart, and the
    # cached file state is copied, never extended in place.
    names = [f"site-{k}" for k in range(60)]
    prints = {_scenario_fingerprint("mnist", n, "alpha=0.5") for n in names}
    assert len(prints) == 60
    assert _scenario_fingerprint("mnist", "site-3", "alpha=0.5") == expected.hexdigest()
    untouched = hashlib.sha256(data_file("mnist.npz").read_bytes()).hexdigest()
    assert _shipped_file_digest("mnist").hexdigest() == untouched
