"""Property tests of the codecs: round trip within bound, unbiasedness, error feedback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsafe.compression import (
    ErrorFeedback,
    decode_update,
    encode_update,
    layout_of,
    parse_compression,
    serialized_size,
)
from fedsafe.compression.quantize import INT4_LEVELS, INT8_LEVELS, max_norm_scales
from fedsafe.compression.topk import (
    bitpack_decode,
    bitpack_encode,
    encode_indices,
    gaps_to_indices,
    indices_to_gaps,
    top_k_count,
    varint_decode,
    varint_encode,
)

SETTINGS = settings(max_examples=40, deadline=None)

finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
shapes = st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple)
tensors = shapes.flatmap(lambda s: arrays(np.float32, s, elements=finite32))
updates = st.dictionaries(
    st.text("abcdefgh.", min_size=1, max_size=8), tensors, min_size=1, max_size=3
)
seeds = st.integers(0, 2**32 - 1)


def _roundtrip(update, spec, seed, feedback=None):
    record, stats = encode_update(
        update, parse_compression(spec), np.random.default_rng(seed), feedback
    )
    assert stats.encoded_bytes == serialized_size(record)
    return decode_update(record, layout_of(update)), stats


@SETTINGS
@given(updates, seeds)
def test_none_is_exact_and_flower_plain(update, seed):
    decoded, stats = _roundtrip(update, "none", seed)
    assert stats.ratio == 1.0
    for name, value in update.items():
        np.testing.assert_array_equal(decoded[name], value)


@SETTINGS
@given(updates, seeds)
def test_float16_relative_error(update, seed):
    decoded, _ = _roundtrip(update, "float16", seed)
    for name, value in update.items():
        assert decoded[name].dtype == np.float32 and decoded[name].shape == value.shape
        x = value.astype(np.float64)
        # Half precision: 11-bit significand (relative 2^-11), subnormal spacing 2^-24.
        assert np.all(np.abs(decoded[name] - x) <= np.abs(x) * 2.0**-11 + 2.0**-25)


@SETTINGS
@pytest.mark.parametrize("spec,levels", [("int8", INT8_LEVELS), ("int4", INT4_LEVELS)])
@given(update=updates, seed=seeds)
def test_quantized_error_within_one_scale(spec, levels, update, seed):
    decoded, _ = _roundtrip(update, spec, seed)
    for name, value in update.items():
        x = value.astype(np.float64).ravel()
        scale = float(max_norm_scales(x, levels, x.size)[0])
        err = np.abs(decoded[name].astype(np.float64).ravel() - x)
        assert np.all(err <= scale * (1 + 1e-6) + np.abs(x) * 2.0**-23)


@SETTINGS
@given(
    arrays(np.float32, st.integers(1, 300), elements=finite32),
    st.integers(1, 64),
    st.sampled_from(["int8", "int4"]),
    seeds,
)
def test_chunked_quantization_error_per_chunk(x, chunk, codec, seed):
    levels = INT8_LEVELS if codec == "int8" else INT4_LEVELS
    decoded, _ = _roundtrip({"w": x}, f"{codec}:chunk={chunk}", seed)
    x64 = x.astype(np.float64)
    scales = np.repeat(max_norm_scales(x64, levels, chunk).astype(np.float64), chunk)[: x.size]
    err = np.abs(decoded["w"].astype(np.float64) - x64)
    assert np.all(err <= scales * (1 + 1e-6) + np.abs(x64) * 2.0**-23)


@SETTINGS
@given(updates, st.sampled_from([0.01, 0.1, 0.5, 1.0]), seeds)
def test_topk_exact_on_kept_and_zero_elsewhere(update, fraction, seed):
    decoded, stats = _roundtrip(update, f"topk:{fraction}", seed)
    sent = 0
    for name, value in update.items():
        out = decoded[name].ravel()
        kept = np.flatnonzero(out)
        k = top_k_count(value.size, fraction)
        sent += k
        np.testing.assert_array_equal(out[kept], value.ravel()[kept])
        # Every dropped entry is no larger than every kept one.
        dropped = np.setdiff1d(np.arange(value.size), kept)
        if kept.size and dropped.size:
            assert np.abs(value.ravel()[dropped]).max() <= np.abs(value.ravel()[kept]).min()
        assert kept.size <= k
    assert stats.values_sent == sent


@pytest.mark.parametrize("spec,levels", [("int8", INT8_LEVELS), ("int4", INT4_LEVELS)])
def test_stochastic_quantization_is_unbiased(spec, levels):
    rng = np.random.default_rng(7)
    x = rng.normal(size=64).astype(np.float32)
    x[:4] = [0.0, 1e-6, -1e-6, float(np.abs(x).max())]
    pipeline = parse_compression(spec)
    draws = 2000
    total = np.zeros(x.size)
    for _ in range(draws):
        record, _ = encode_update({"w": x}, pipeline, rng)
        total += decode_update(record)["w"]
    mean = total / draws
    scale = float(np.abs(x).max()) / levels
    # Each draw's error lies in (-s, s), so its std is <= s/2: the mean is within 5 sigma.
    bound = 5 * (scale / 2) / np.sqrt(draws)
    assert np.all(np.abs(mean - x) <= bound)
    # And it is biased without randomness: rounding to nearest would miss by up to s/2.
    assert bound < scale / 4


@SETTINGS
@given(
    st.lists(arrays(np.float32, (5, 7), elements=finite32), min_size=1, max_size=4),
    st.sampled_from(
        [
            "topk:0.1",
            "topk:0.3+int8",
            "topk:0.05+int4:chunk=4",
            "int8",
            "float16",
            "sign",
            "sign:chunk=4",
            "randk:0.3",
            "randk:0.5+sign:chunk=8",
            "randk:0.2+int4",
        ]
    ),
    seeds,
)
def test_error_feedback_carries_exactly_what_was_dropped(rounds, spec, seed):
    pipeline = parse_compression(spec)
    feedback = ErrorFeedback()
    rng = np.random.default_rng(seed)
    total_in = np.zeros((5, 7))
    total_sent = np.zeros((5, 7))
    for update in rounds:
        before = feedback.residual("w", (5, 7)).copy()
        record, _ = encode_update({"w": update}, pipeline, rng, feedback)
        sent = decode_update(record)["w"].astype(np.float64)
        after = feedback.residual("w", (5, 7))
        corrected = update.astype(np.float64) + before
        if spec in ("topk:0.1", "randk:0.3"):
            # Float32 values are sent as they are: the split is exact.
            np.testing.assert_array_equal(after + sent, corrected)
        else:
            np.testing.assert_allclose(after + sent, corrected, rtol=1e-12, atol=1e-12)
        total_in += update
        total_sent += sent
    # Nothing is lost, only delayed: all sent plus the residual is all input.
    np.testing.assert_allclose(total_sent + feedback.residual("w", (5, 7)), total_in, atol=1e-6)


def test_error_feedback_serializes():
    feedback = ErrorFeedback()
    rng = np.random.default_rng(0)
    encode_update(
        {"w": rng.normal(size=(3, 4)).astype(np.float32)},
        parse_compression("topk:0.2"),
        rng,
        feedback,
    )
    for restored in (
        ErrorFeedback.from_bytes(feedback.to_bytes()),
        ErrorFeedback.from_array_record(feedback.to_array_record()),
    ):
        np.testing.assert_array_equal(
            restored.residual("w", (3, 4)), feedback.residual("w", (3, 4))
        )
    with pytest.raises(ValueError, match="reset the residual"):
        feedback.residual("w", (4, 3))


def test_encode_refuses_non_finite_and_float16_overflow():
    with pytest.raises(ValueError, match="non-finite"):
        encode_update(
            {"w": np.array([np.nan], np.float32)},
            parse_compression("int8"),
            np.random.default_rng(0),
            None,
        )
    with pytest.raises(ValueError, match="float16"):
        encode_update(
            {"w": np.array([1e6], np.float32)},
            parse_compression("float16"),
            np.random.default_rng(0),
            None,
        )


def test_encode_failure_leaves_feedback_untouched():
    feedback = ErrorFeedback({"a": np.ones(3)})
    update = {"a": np.ones(3, np.float32), "b": np.array([np.inf], np.float32)}
    with pytest.raises(ValueError):
        encode_update(update, parse_compression("topk:0.5"), np.random.default_rng(0), feedback)
    np.testing.assert_array_equal(feedback.residual("a", (3,)), np.ones(3))


@SETTINGS
@given(st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_varint_roundtrip(values):
    v = np.array(values, dtype=np.uint64)
    decoded = varint_decode(varint_encode(v), v.size)
    assert decoded is not None
    np.testing.assert_array_equal(decoded, v)


@SETTINGS
@given(st.sets(st.integers(0, 100_000), min_size=1, max_size=200))
def test_index_coding_roundtrip_and_choice(index_set):
    indices = np.array(sorted(index_set), dtype=np.int64)
    gaps = indices_to_gaps(indices)
    np.testing.assert_array_equal(gaps_to_indices(gaps), indices)
    coding, width, payload = encode_indices(indices)
    varint = varint_encode(gaps)
    packed = bitpack_encode(gaps, max(1, int(gaps.max()).bit_length()))
    assert len(payload) == min(len(varint), len(packed))
    if width:
        decoded = bitpack_decode(payload, indices.size, width)
    else:
        decoded = varint_decode(payload, indices.size)
    assert decoded is not None
    np.testing.assert_array_equal(gaps_to_indices(decoded), indices)


def test_compression_ratio_on_a_cnn_sized_update():
    rng = np.random.default_rng(0)
    update = {
        "conv": rng.normal(size=(32, 16, 3, 3)).astype(np.float32),
        "fc": rng.normal(size=(40, 512)).astype(np.float32),
    }
    _, int8 = encode_update(update, parse_compression("int8"), rng)
    _, topk = encode_update(update, parse_compression("topk:0.01+int8"), rng, ErrorFeedback())
    assert int8.ratio > 3.9
    assert topk.ratio > 32


@SETTINGS
@given(updates, st.sampled_from(["sign", "sign:chunk=3"]), seeds)
def test_sign_keeps_signs_and_mean_magnitude(update, spec, seed):
    decoded, stats = _roundtrip(update, spec, seed)
    chunk = 3 if spec.endswith("3") else None
    for name, value in update.items():
        x = value.astype(np.float64).ravel()
        got = decoded[name].astype(np.float64).ravel()
        # The sign is kept (zero goes to +scale) and |sent| is the chunk's mean |x|.
        # No sign flips (a denormal's scale may round to a signed zero).
        assert np.all((got > 0) <= (x >= 0)) and np.all((got < 0) <= (x < 0))
        size = chunk or x.size
        for start in range(0, x.size, size):
            part = np.abs(x[start : start + size])
            np.testing.assert_allclose(
                np.abs(got[start : start + size]), np.float32(part.mean()), rtol=1e-6
            )
    assert stats.values_sent == stats.values_total


@SETTINGS
@given(updates, st.floats(0.05, 1.0), seeds)
def test_random_k_sends_exact_values_on_the_seeded_mask(update, fraction, seed):
    decoded, stats = _roundtrip(update, f"randk:{fraction}", seed)
    kept = 0
    for name, value in update.items():
        got = decoded[name]
        on_mask = got != 0
        np.testing.assert_array_equal(got[on_mask], value[on_mask])
        kept += int(np.count_nonzero(on_mask | (value == 0)))
    assert stats.values_sent <= kept


def test_random_k_mask_is_fixed_by_the_seed_and_keeps_the_fraction():
    from fedsafe.compression.randk import random_mask_indices, splitmix64, threshold_for

    # SplitMix64's published first outputs from state 0 (Steele, Lea, Flood 2014; the same
    # sequence as Java's SplittableRandom and Vigna's reference C code).
    first = splitmix64(np.array([0], dtype=np.uint64))[0]
    assert int(first) == 0xE220A8397B1DCDAF
    a = random_mask_indices(12345, threshold_for(0.25), 100_000)
    b = random_mask_indices(12345, threshold_for(0.25), 100_000)
    c = random_mask_indices(12346, threshold_for(0.25), 100_000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Binomial(100000, 0.25): standard deviation 137, so 5 sigma is about 700.
    assert abs(a.size - 25_000) < 700
    assert random_mask_indices(7, threshold_for(1.0), 1000).size == 1000


def test_sign_and_random_k_reach_32x_on_a_cnn_sized_update():
    rng = np.random.default_rng(0)
    update = {
        "conv.weight": rng.normal(size=(32, 16, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(size=(10, 2048)).astype(np.float32),
        "fc.bias": rng.normal(size=10).astype(np.float32),
    }
    _, sign_stats = _roundtrip(update, "sign", 0)
    _, randk_stats = _roundtrip(update, "randk:0.5+sign", 0)
    assert 28 < sign_stats.ratio < 32  # one bit per value plus the record's framing
    assert randk_stats.ratio > 45


def _unbiased_nmse(x, spec, draws):
    """Mean NMSE of ``draws`` codings of ``x``; asserts that their mean is unbiased."""
    norm = float((x["w"].astype(np.float64) ** 2).sum())
    total = np.zeros(x["w"].shape)
    errors = []
    for seed in range(draws):
        decoded, _ = _roundtrip(x, spec, seed)
        got = decoded["w"].astype(np.float64)
        total += got
        errors.append(float(((got - x["w"]) ** 2).sum()) / norm)
    # Unbiased: the mean of the draws errs only by the variance over the draws.
    bias = float(((total / draws - x["w"]) ** 2).sum()) / norm
    assert bias < 3 * np.mean(errors) / draws
    return float(np.mean(errors))


def test_rotated_sign_is_unbiased_with_the_drive_error():
    rng = np.random.default_rng(1)
    x = {"w": (rng.normal(size=(40, 50)) + 0.2).astype(np.float32)}
    for spec, nmse in (("rsign", np.pi / 2 - 1), ("rsign:keep=0.6", (np.pi / 2) / 0.6 - 1)):
        # The error of one draw is DRIVE's (EDEN's with subsampling), within 10%.
        assert _unbiased_nmse(x, spec, 300) == pytest.approx(nmse, rel=0.1)


ROTATED_SPECS = [
    "rsign",
    "rsign:chunk=4",
    "rsign:chunk=2,keep=0.5",
    "rvq",
    "rvq:chunk=16,bits=3",
    "rvq:chunk=32,bits=16",
]


@SETTINGS
@given(updates, st.sampled_from(ROTATED_SPECS), seeds)
def test_rotated_codes_round_trip_finite_and_sized(update, spec, seed):
    decoded, stats = _roundtrip(update, spec, seed)
    for name, value in update.items():
        assert decoded[name].shape == value.shape
        assert np.all(np.isfinite(decoded[name]))
    assert stats.values_sent == stats.values_total


def test_rotated_vq_is_unbiased_with_the_random_code_error():
    rng = np.random.default_rng(3)
    x = {"w": (rng.normal(size=(64, 50)) + 0.2).astype(np.float32)}
    # NMSE of a random spherical code of 2^b words for blocks of 16 (module docstring), and
    # rsign subsampled to the same bits per value for comparison.
    for spec, nmse, eden in (("rvq", 0.86, 1.285), ("rvq:bits=13", 0.65, 0.933)):
        error = _unbiased_nmse(x, spec, 200)
        assert error == pytest.approx(nmse, rel=0.1)
        assert error < 0.8 * eden


def test_rvq_index_packing_round_trips_and_codebook_is_fixed():
    from fedsafe.compression.vq import codebook, pack_indices, unpack_indices

    rng = np.random.default_rng(4)
    for bits in (1, 5, 11, 16):
        idx = rng.integers(0, 2**bits, size=37)
        packed = pack_indices(idx, bits)
        assert len(packed) == (37 * bits + 7) // 8
        np.testing.assert_array_equal(unpack_indices(packed, 37, bits), idx)
    assert unpack_indices(b"\x00", 2, 5) is None  # 10 bits need 2 bytes
    book = codebook(11)
    assert book.shape == (2048, 16)
    np.testing.assert_allclose(np.linalg.norm(book, axis=1), 1.0)
    # Part of the wire format: pinned, so a change of numpy or of the generator is caught.
    np.testing.assert_allclose(
        [book[0, 0], book[0, 1], book[0, 2], book[1234, 7], book[-1, -1]],
        [0.3230970339590919, -0.4595222666185266, 0.054989853921479454, -0.6890484673678554,
         -0.05303715063419668],
        rtol=1e-12,
    )  # fmt: skip
    assert abs(float(book.mean())) < 0.01


def test_rotation_is_orthonormal_and_padded_to_powers_of_two():
    from fedsafe.compression.rotation import padded_chunks, rotate, unrotate

    rng = np.random.default_rng(2)
    x = rng.normal(size=1000)
    assert padded_chunks(1000, 256) == [(0, 256, 256), (256, 256, 256), (512, 256, 256),
                                        (768, 232, 256)]  # fmt: skip
    y = rotate(x, 256, seed=9)
    assert y.size == 1024
    assert float(y @ y) == pytest.approx(float(x @ x))
    np.testing.assert_allclose(unrotate(y, 1000, 256, seed=9), x, atol=1e-12)
