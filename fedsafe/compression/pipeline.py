"""Compression pipelines chosen per run with ``--compression``, and where they may run.

A pipeline is at most one sparsifier (top-k, or random-k with a shared seed) followed by at
most one value codec (float16, int8 or int4 stochastic quantization, 1-bit sign, or a rotated
code: ``rsign`` or ``rvq``). Spec
strings::

    none | float16 | int8 | int4 | int8:chunk=1024 | int4:chunk=256 | sign | sign:chunk=256
    topk:0.01 | topk:0.01+int8 | topk:0.001+int4:chunk=64 | topk:0.01+float16
    randk:0.25+sign:chunk=256 | randk:0.1+int8
    rsign | rsign:keep=0.6 | rsign:chunk=512,keep=0.6
    rvq | rvq:bits=10 | rvq:chunk=4096,bits=12

``rsign`` is the unbiased one-bit code after a random rotation (DRIVE/EDEN, see
:mod:`fedsafe.compression.rotation`); ``keep`` sends that fraction of the rotated signs.
``rvq`` is the unbiased vector code after the same rotation: ``bits`` bits per 16 rotated
values (default 11, about 0.69 bits per value; see :mod:`fedsafe.compression.vq`). Neither
takes a sparsifier. ``sign`` and both sparsifiers are biased, so the site keeps an
error-feedback residual for them (:mod:`fedsafe.compression.error_feedback`).

Why compression must come after the DP noise
--------------------------------------------
A site's update is released through the Gaussian mechanism of DP-SGD (clip, then noise). Any
function of that release that does not look at the private data again is post-processing, and
by the post-processing theorem (Dwork & Roth, "The Algorithmic Foundations of Differential
Privacy", 2014, Proposition 2.1) it is (epsilon, delta)-DP with the same epsilon and delta.
Compression (top-k, quantization, the random rounding and the error-feedback residual) reads
only the privatized update and its own past outputs, so the guarantee is unchanged and no
privacy is accounted for it.

Compressing *before* privatization is a different mechanism: top-k picks coordinates from the
raw data-dependent update, and the error-feedback residual would carry un-noised data into
later rounds. The accountant's analysis does not cover that, so :func:`assert_post_privatization`
refuses it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from fedsafe.errors import UserError

VALID_FORMS = (
    "none, float16, int8, int4, sign, int8:chunk=N, int4:chunk=N, sign:chunk=N, topk:F, "
    "topk:F+int8, topk:F+int4:chunk=N, topk:F+float16, randk:F+sign:chunk=N, randk:F+int8, "
    "rsign, rsign:keep=F, rsign:chunk=P,keep=F, rvq, rvq:bits=B, rvq:chunk=P,bits=B "
    "(F a fraction in (0, 1], N an integer >= 1, P a power of two, B an integer in 1..16)"
)
CHUNKED_CODECS = ("int8", "int4", "sign", "rsign", "rvq")
#: Rotation chunk of ``rsign`` and ``rvq`` when none is given.
DEFAULT_RSIGN_CHUNK = 1024
#: Index bits per 16 rotated values of ``rvq`` when none are given.
DEFAULT_RVQ_BITS = 11
#: Codecs that rotate the whole update as one flat vector.
ROTATED_CODECS = ("rsign", "rvq")


class ValueCodec(enum.IntEnum):
    """How the sent values are coded; the integer is the codec id on the wire."""

    FLOAT32 = 0
    FLOAT16 = 1
    INT8 = 2
    INT4 = 3
    #: One bit per value (its sign) and one scale per chunk (mean magnitude); biased.
    SIGN = 4
    #: One bit per kept rotated value, unbiased (DRIVE / EDEN).
    RSIGN = 5
    #: One codeword index per 16 rotated values, unbiased (see :mod:`.vq`).
    RVQ = 6


class CompressionStage(enum.Enum):
    """Where in the client's pipeline compression is applied."""

    #: On the update produced by the DP optimizer (clipped and noised): post-processing.
    POST_PRIVATIZATION = "post_privatization"
    #: On the raw update before DP noise: refused, the DP analysis would not cover it.
    PRE_PRIVATIZATION = "pre_privatization"


@dataclass(frozen=True, slots=True)
class CompressionPipeline:
    """A validated compression pipeline: optional top-k or random-k, then one value codec.

    Parameters
    ----------
    topk_fraction
        Fraction of each tensor's entries kept by top-k, in (0, 1]; None for dense.
    value_codec
        Coding of the sent values.
    chunk
        Values per scale for int8/int4/sign; None for one scale per tensor.
    randk_fraction
        Expected fraction of each tensor's entries kept by random-k, in (0, 1]; None for
        dense. The kept positions follow from a seed sent with the update, so no index is
        sent (:mod:`fedsafe.compression.randk`).
    keep
        For ``rsign``: the fraction of rotated coordinates whose sign is sent; None for all.
    bits
        For ``rvq``: index bits per 16 rotated values (1..16); None for the default.
    """

    topk_fraction: float | None = None
    value_codec: ValueCodec = ValueCodec.FLOAT32
    chunk: int | None = None
    randk_fraction: float | None = None
    keep: float | None = None
    bits: int | None = None

    def __post_init__(self) -> None:
        for name, fraction in (("top-k", self.topk_fraction), ("random-k", self.randk_fraction)):
            if fraction is not None and not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
                raise UserError(
                    f"--compression: {name} fraction must be in (0, 1], got {fraction}; "
                    "e.g. topk:0.01 or randk:0.25"
                )
        if self.topk_fraction is not None and self.randk_fraction is not None:
            raise UserError("--compression: use one sparsifier, topk or randk, not both")
        if not isinstance(self.value_codec, ValueCodec):
            raise UserError(f"--compression: unknown value codec {self.value_codec!r}")
        if self.flat:
            name = self.value_codec.name.lower()
            if self.sparsifier is not None:
                raise UserError(
                    f"--compression: {name} takes no sparsifier; use rsign:keep=F or "
                    "rvq:bits=B to send fewer bits"
                )
            smallest = 16 if self.value_codec is ValueCodec.RVQ else 1
            if self.chunk is not None and not (
                self.chunk >= smallest
                and self.chunk & (self.chunk - 1) == 0
                and self.chunk <= 2**24
            ):
                raise UserError(
                    f"--compression: {name} chunk must be a power of two in "
                    f"[{smallest}, 2^24], got {self.chunk}"
                )
        if self.bits is not None:
            if self.value_codec is not ValueCodec.RVQ:
                raise UserError("--compression: bits= applies to rvq only")
            if int(self.bits) != self.bits or not 1 <= self.bits <= 16:
                raise UserError(f"--compression: rvq bits must be in 1..16, got {self.bits}")
        if self.keep is not None:
            if self.value_codec is not ValueCodec.RSIGN:
                raise UserError("--compression: keep= applies to rsign only")
            if not (math.isfinite(self.keep) and 0.0 < self.keep <= 1.0):
                raise UserError(f"--compression: keep must be in (0, 1], got {self.keep}")
        if self.chunk is not None:
            if self.value_codec not in (
                ValueCodec.INT8,
                ValueCodec.INT4,
                ValueCodec.SIGN,
                ValueCodec.RSIGN,
                ValueCodec.RVQ,
            ):
                raise UserError("--compression: chunk= applies to int8, int4, sign, rsign and rvq")
            if int(self.chunk) != self.chunk or self.chunk < 1 or self.chunk >= 2**32:
                raise UserError(
                    f"--compression: chunk must be an integer in [1, 2^32), got {self.chunk}"
                )

    @property
    def is_identity(self) -> bool:
        """True for ``none``: updates go in Flower's plain ``ArrayRecord`` format."""
        return self.sparsifier is None and self.value_codec is ValueCodec.FLOAT32

    @property
    def flat(self) -> bool:
        """True when the whole update is coded as one flat vector (``rsign``, ``rvq``)."""
        return self.value_codec in (ValueCodec.RSIGN, ValueCodec.RVQ)

    @property
    def sparsifier(self) -> str | None:
        """``"topk"``, ``"randk"`` or None (dense)."""
        if self.topk_fraction is not None:
            return "topk"
        return "randk" if self.randk_fraction is not None else None

    @property
    def needs_error_feedback(self) -> bool:
        """True when entries are dropped or the codec is biased (sign): keep a residual."""
        return self.sparsifier is not None or self.value_codec is ValueCodec.SIGN

    @property
    def spec(self) -> str:
        """The canonical spec string (``parse_compression(p.spec) == p``)."""
        parts: list[str] = []
        if self.topk_fraction is not None:
            parts.append(f"topk:{self.topk_fraction!r}")
        if self.randk_fraction is not None:
            parts.append(f"randk:{self.randk_fraction!r}")
        if self.value_codec is not ValueCodec.FLOAT32:
            codec = self.value_codec.name.lower()
            options = [f"chunk={self.chunk}"] if self.chunk is not None else []
            options += [f"keep={self.keep!r}"] if self.keep is not None else []
            options += [f"bits={self.bits}"] if self.bits is not None else []
            parts.append(codec + (":" + ",".join(options) if options else ""))
        return "+".join(parts) if parts else "none"


def _bad(spec: str, why: str) -> UserError:
    return UserError(f"--compression {spec!r}: {why}. Valid forms: {VALID_FORMS}")


def _option(
    spec: str,
    codec: str,
    owner: str,
    key: str,
    value: str,
    convert: Callable[[str], float],
    valid: Callable[[float], bool],
    bounds: str,
) -> float:
    """The value of option ``key=value`` of ``codec`` (only ``owner`` takes it), checked."""
    if codec != owner:
        raise _bad(spec, f"{key}= applies to {owner} only")
    try:
        number = convert(value)
    except ValueError:
        raise _bad(spec, f"{owner} {key} must be in {bounds}, got {value!r}") from None
    if not (math.isfinite(number) and valid(number)):
        raise _bad(spec, f"{owner} {key} must be in {bounds}, got {value}")
    return number


def parse_compression(spec: str) -> CompressionPipeline:
    """Parse a ``--compression`` spec string.

    Parameters
    ----------
    spec
        E.g. ``"none"``, ``"int8"``, ``"int8:chunk=1024"``, ``"topk:0.01+int8"``.

    Returns
    -------
    CompressionPipeline
        The validated pipeline.

    Raises
    ------
    UserError
        Naming ``--compression``, what is wrong and the valid forms.
    """
    text = spec.strip().lower()
    if text in ("", "none"):
        return CompressionPipeline()
    fractions: dict[str, float] = {}
    codec = ValueCodec.FLOAT32
    chunk: int | None = None
    keep: float | None = None
    bits: int | None = None
    seen_codec = False
    for position, stage in enumerate(text.split("+")):
        name, _, arg = stage.partition(":")
        name = name.strip()
        if name in ("topk", "randk"):
            if position != 0:
                raise _bad(spec, f"{name} must be the first stage (one sparsifier at most)")
            try:
                fraction = float(arg)
            except ValueError:
                raise _bad(
                    spec, f"{name} needs a fraction, e.g. {name}:0.01, got {arg!r}"
                ) from None
            if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
                raise _bad(spec, f"{name} fraction must be in (0, 1], got {arg}")
            fractions[name] = fraction
        elif name in ("float16", *CHUNKED_CODECS):
            if seen_codec:
                raise _bad(
                    spec, "at most one value codec (float16, int8, int4, sign, rsign or rvq)"
                )
            seen_codec = True
            codec = ValueCodec[name.upper()]
            for option in arg.split(",") if arg else []:
                key, _, value = option.partition("=")
                key = key.strip()
                if name == "float16" or key not in ("chunk", "keep", "bits"):
                    raise _bad(spec, f"unknown option {option!r} for {name}")
                if key == "bits":
                    bits = int(
                        _option(spec, name, "rvq", key, value, int, lambda b: 1 <= b <= 16, "1..16")
                    )
                    continue
                if key == "keep":
                    keep = _option(
                        spec, name, "rsign", key, value, float, lambda f: 0 < f <= 1, "(0, 1]"
                    )
                    continue
                try:
                    chunk = int(value)
                except ValueError:
                    raise _bad(spec, f"chunk must be an integer, got {value!r}") from None
                if not 1 <= chunk < 2**32:
                    raise _bad(spec, f"chunk must be in [1, 2^32), got {chunk}")
                if name in ROTATED_CODECS and chunk & (chunk - 1):
                    raise _bad(spec, f"{name} chunk must be a power of two, got {chunk}")
                if name == "rvq" and chunk < 16:
                    raise _bad(spec, f"rvq chunk must be at least 16, got {chunk}")
        elif name == "none":
            raise _bad(spec, "'none' cannot be combined with other stages")
        else:
            raise _bad(spec, f"unknown stage {name!r}")
    if codec in (ValueCodec.RSIGN, ValueCodec.RVQ) and fractions:
        raise _bad(
            spec, f"{codec.name.lower()} takes no sparsifier; use rsign:keep=F or rvq:bits=B"
        )
    return CompressionPipeline(
        topk_fraction=fractions.get("topk"),
        value_codec=codec,
        chunk=chunk,
        randk_fraction=fractions.get("randk"),
        keep=keep,
        bits=bits,
    )


def assert_post_privatization(
    dp_enabled: bool,
    pipeline: CompressionPipeline,
    stage: CompressionStage = CompressionStage.POST_PRIVATIZATION,
) -> None:
    """Refuse a configuration that would compress before the DP noise is added.

    Parameters
    ----------
    dp_enabled
        Whether the run privatizes updates with DP.
    pipeline
        The run's compression pipeline.
    stage
        Where the client applies compression.

    Raises
    ------
    UserError
        If DP is on, the pipeline compresses, and ``stage`` is ``PRE_PRIVATIZATION``.
    """
    if dp_enabled and not pipeline.is_identity and stage is not CompressionStage.POST_PRIVATIZATION:
        raise UserError(
            f"--compression {pipeline.spec}: compressing before the DP noise is refused; the "
            "privacy analysis covers compression only as post-processing of the privatized "
            "update (Dwork & Roth 2014, Prop. 2.1). Compress after privatization "
            "(CompressionStage.POST_PRIVATIZATION) or use --compression none."
        )


def check_downlink(pipeline: CompressionPipeline) -> None:
    """Refuse sparsifiers, sign, rsign and rvq for the global model sent to the sites.

    The coordinator keeps no error-feedback residual for the downlink, so a codec that drops
    weights (top-k, random-k) or is biased (sign) would corrupt the global model, and the
    rotated codes' error (of the order of the weights themselves) is only tolerable on
    updates averaged over sites.

    Raises
    ------
    UserError
        If the pipeline sparsifies or uses sign.
    """
    if pipeline.needs_error_feedback or pipeline.flat:
        raise UserError(
            f"--downlink-compression {pipeline.spec}: sparsifiers, sign, rsign and rvq would drop, "
            "bias or blur the global model's weights; use none, float16, int8 or int4"
        )
