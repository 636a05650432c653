"""The public Task API: a validated value, imported by path, its model seeded and checked."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fedsafe
from fedsafe.errors import UserError
from fedsafe.models import build_model
from fedsafe.tasks.csv_task import scaled_defaults
from fedsafe.tasks.shipped import shipped_task
from fedsafe.tasks.task import (
    SiteRef,
    Task,
    TaskDefaults,
    build_task_model,
    load_task,
    site_data_from_tensors,
)


def _load(site: SiteRef) -> fedsafe.SiteData:
    rng = np.random.default_rng(site.index + 1)  # synthetic test data, not privacy
    x = rng.normal(size=(60, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    return fedsafe.SiteData(f"s{site.index}", x[:40], y[:40], x[40:], y[40:], ("a", "b", "c"))


def _linear(num_features: int, generator: torch.Generator) -> nn.Module:
    return nn.Linear(num_features, 1)


def test_the_public_names_are_the_task_api() -> None:
    from fedsafe.tasks import task as module

    assert fedsafe.Task is module.Task and fedsafe.TaskDefaults is module.TaskDefaults
    assert callable(fedsafe.client_app) and callable(fedsafe.server_app)


def test_an_undeclared_metric_is_refused_naming_the_declared_ones() -> None:
    with pytest.raises(UserError, match=r"'f1' are not declared releases; choose from loss"):
        Task("t", _load, _linear, metrics=("accuracy", "f1"))
    with pytest.raises(UserError, match="headline 'roc-auc' is not one of its metrics"):
        Task("t", _load, _linear, metrics=("accuracy",), headline="roc-auc")
    with pytest.raises(UserError, match="Task name"):
        Task("bad name!", _load, _linear)


def test_defaults_are_validated_and_scaled_defaults_override_fixed_ones() -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        TaskDefaults(max_grad_norm=1e-9)
    with pytest.raises(ValueError, match="lr"):
        TaskDefaults(lr=float("nan"))
    fixed = Task("t", _load, _linear, defaults=TaskDefaults(batch_size=8))
    assert fixed.defaults_for(10_000).batch_size == 8
    scaled = Task("t", _load, _linear, scaled_defaults=scaled_defaults)
    assert scaled.defaults_for(1800).batch_size == 64


def test_csv_defaults_scale_with_the_public_size() -> None:
    # The heart-tuned setting for a 190-record site, a larger batch and more steps above.
    assert (scaled_defaults(190).batch_size, scaled_defaults(190).local_steps) == (4, 10)
    assert (scaled_defaults(1800).batch_size, scaled_defaults(1800).local_steps) == (64, 20)
    assert scaled_defaults(10**7).batch_size == 256
    assert scaled_defaults(1).batch_size == 4
    with pytest.raises(ValueError):
        scaled_defaults(0)


def test_load_task_imports_a_module_outside_the_package(tmp_path, monkeypatch) -> None:
    (tmp_path / "outside_task.py").write_text(
        textwrap.dedent(
            """
            import torch
            from fedsafe import Task

            def load(site):
                raise RuntimeError("not called here")

            task = Task("outside", load, lambda n, g: torch.nn.Linear(n, 2),
                        metrics=("loss", "accuracy"))
            not_a_task = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("outside_task:task")
    assert task.name == "outside" and task.headline == "accuracy"
    with pytest.raises(UserError, match=r"outside_task.not_a_task is a int, not a fedsafe.Task"):
        load_task("outside_task:not_a_task")
    with pytest.raises(UserError, match=r"module 'no_such_module' does not import"):
        load_task("no_such_module:task")
    with pytest.raises(UserError, match=r"write package.module:attr"):
        load_task("outside_task.py")
    sys.modules.pop("outside_task", None)


def test_the_model_is_seeded_the_same_everywhere_and_checked_for_dp() -> None:
    task = Task("t", _load, lambda n, g: nn.Linear(n, 4))
    a, b, c = (build_task_model(task, 3, s) for s in (42, 42, 43))
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    state = torch.random.get_rng_state()
    build_task_model(task, 3, 7)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is restored

    def with_batchnorm(n: int, g: torch.Generator) -> nn.Module:
        return nn.Sequential(nn.Linear(n, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    fixed = build_task_model(Task("bn", _load, with_batchnorm), 3, 42)
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    with pytest.raises(UserError, match="returned a int, not a torch.nn.Module"):
        build_task_model(Task("t", _load, lambda n, g: 3), 3, 42)  # type: ignore[arg-type,return-value]


def test_shipped_tasks_build_fedsafe_models_with_the_same_weights() -> None:
    heart = shipped_task("heart")
    site = heart.load(SiteRef(0, 4))
    model = build_task_model(heart, site.num_features, 42)
    reference = build_model("logreg", site.num_features, 42)
    for got, want in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want)
    assert heart.headline == "accuracy" and heart.defaults.batch_size == 4
    assert heart.load(SiteRef(name=site.name)).name == site.name  # a deployed site, by name
    with pytest.raises(ValueError, match="does not exist"):
        SiteRef(4, 4)
    assert load_task("fedsafe.tasks.lending:task").headline == "roc-auc"


def test_site_data_from_tensors_and_from_a_dataset() -> None:
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 3
    data = site_data_from_tensors("s", (x[:6], y[:6]), TensorDataset(x[6:], y[6:]))
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int64
    assert data.x_test.shape == (4, 2) and data.feature_names == ("x0", "x1")


def test_the_readme_task_is_a_task_that_loads_and_builds() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 10

    def my_records(index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(index)  # synthetic test data, not privacy
        x = rng.normal(size=(1000, 2)).astype(np.float32)
        return x, (x[:, 0] > 0).astype(np.float32)

    namespace: dict[str, object] = {"my_records": my_records}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    task = namespace["task"]
    assert isinstance(task, Task) and task.headline == "roc-auc"
    site = task.load(SiteRef(1, 2))
    model = build_task_model(task, site.num_features, 42)
    assert model(torch.from_numpy(site.x_test)).shape == (200, 1)
