"""What the shipped tasks share: their sites by partition or name, fedsafe's models.

The tasks themselves are ``fedsafe.tasks.heart:task``, ``fedsafe.tasks.lending:task`` and
``fedsafe.tasks.mnist:task``, importable by path like a user's own task. Their data ship inside
the package (:mod:`fedsafe.data`); their models are fedsafe's (:mod:`fedsafe.models`); their
defaults are the tuned ones of BENCHMARKS.md.
"""

from __future__ import annotations

from torch import nn

from fedsafe.data.site_data import SiteData
from fedsafe.models import build_model
from fedsafe.tasks.scenarios import load_scenario
from fedsafe.tasks.task import ModelFactory, SiteRef, Task


def scenario_site(scenario: str, site: SiteRef) -> SiteData:
    """A shipped scenario's site: by partition (simulated) or by name (deployed).

    Raises
    ------
    ValueError
        If the scenario has no such site.
    """
    options = site.options
    loaded = load_scenario(
        scenario,
        int(options.get("lending-sites", 4)),
        int(options.get("mnist-sites", site.num_sites or 10)),
        float(options.get("mnist-alpha", 0.5)),
    )
    if site.index >= 0:
        return loaded.site(site.index)
    for data in loaded.sites:
        if data.name == site.name:
            return data
    names = ", ".join(s.name for s in loaded.sites)
    raise ValueError(f"scenario {scenario!r} has no site {site.name!r}; its sites: {names}")


def fedsafe_model(name: str) -> ModelFactory:
    """A model factory for fedsafe's model ``name`` (:func:`fedsafe.models.build_model`)."""

    def factory(num_features: int, generator: object) -> nn.Module:
        # fedsafe's builders seed from the run's seed (the generator's): the same weights.
        return build_model(name, num_features, int(generator.initial_seed()))  # type: ignore[attr-defined]

    return factory  # type: ignore[return-value]


#: The shipped scenarios' names.
SHIPPED_NAMES = ("heart", "lending", "mnist")


def shipped_task(name: str) -> Task:
    """The shipped task of scenario ``name`` (``heart``, ``lending`` or ``mnist``).

    Raises
    ------
    ValueError
        If ``name`` is not a shipped scenario.
    """
    if name not in SHIPPED_NAMES:
        raise ValueError(f"unknown scenario {name!r}; choose {', '.join(SHIPPED_NAMES)}")
    import importlib

    task = importlib.import_module(f"fedsafe.tasks.{name}").task
    assert isinstance(task, Task)
    return task
