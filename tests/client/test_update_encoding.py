"""The received model decoded once per message (issue 17), never a stale or edited one."""

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedsafe.client.update_encoding import received_state
from fedsafe.models import build_model


def _record(seed: int) -> ArrayRecord:
    return ArrayRecord(build_model("mnist_cnn", 784, seed).state_dict())


def test_the_same_record_is_decoded_once_and_each_call_gets_a_new_dict() -> None:
    record = _record(1)
    first, second = received_state(record), received_state(record)
    assert first is not second
    assert first.keys() == second.keys() == record.keys()
    # One decoding: the tensors are shared (read-only use: load_state_dict copies them).
    assert all(first[k] is second[k] for k in first)
    for k, tensor in first.items():
        assert np.array_equal(tensor.numpy(), record[k].numpy())


def test_another_record_with_equal_values_is_decoded_anew() -> None:
    a, b = _record(2), _record(2)
    from_a, from_b = received_state(a), received_state(b)
    assert all(from_a[k] is not from_b[k] for k in from_a)
    assert all(torch.equal(from_a[k], from_b[k]) for k in from_a)


def test_a_record_edited_in_place_is_decoded_again() -> None:
    record = _record(3)
    before = received_state(record)
    name = next(iter(record.keys()))
    changed = record[name].numpy() + 1.0
    record[name] = Array(changed)  # an entry replaced
    after = received_state(record)
    assert np.array_equal(after[name].numpy(), changed)
    assert not torch.equal(after[name], before[name])
    other = next(k for k in record.keys() if k != name)
    record[other].data = Array(record[other].numpy() * 2.0).data  # bytes reassigned
    again = received_state(record)
    assert np.array_equal(again[other].numpy(), after[other].numpy() * 2.0)


def test_loading_the_shared_tensors_leaves_them_unchanged() -> None:
    record = _record(4)
    state = received_state(record)
    kept = {k: v.clone() for k, v in state.items()}
    model = build_model("mnist_cnn", 784, 5)
    model.load_state_dict(state)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training the loaded model does not touch the received tensors
    assert all(torch.equal(received_state(record)[k], kept[k]) for k in kept)
