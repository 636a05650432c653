"""Model names: the shipped ones unchanged, a schema's MLP widths and class count."""

import pytest
import torch

from fedsafe.models import build_model, parse_model_name


def test_shipped_names_build_the_same_weights_as_the_schema_spelling():
    mlp, spelled = build_model("mlp", 7, seed=3), build_model("mlp-32", 7, seed=3)
    for a, b in zip(mlp.state_dict().values(), spelled.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [p.shape for p in build_model("logreg", 7, seed=3).parameters()] == [(1, 7), (1,)]


def test_hidden_widths_and_classes():
    model = build_model("mlp-64-32/3", 5, seed=1)
    assert model(torch.zeros(4, 5)).shape == (4, 3)
    widths = [m.out_features for m in model if isinstance(m, torch.nn.Linear)]
    assert widths == [64, 32, 3]
    assert parse_model_name("logreg/4") == ("logreg", (), 4)


@pytest.mark.parametrize("name", ["forest", "mlp-0", "logreg/1", "mlp-8/2", "mlp--8"])
def test_unknown_model_names_are_refused(name):
    with pytest.raises(ValueError, match="unknown model"):
        build_model(name, 3, seed=0)
