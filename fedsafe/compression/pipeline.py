"""Compression pipelines chosen per run with ``--compression``, and where they may run.

A pipeline is at most one sparsifier (top-k, or random-k with a shared seed) followed by at
most one value codec (float16, int8 or int4 stochastic quantization, 1-bit sign, or a rotated
code: ``rsign`` or ``rvq``). Each codec, its options and its wire id live in its own module,
listed in :mod:`fedsafe.compression.registry`; this module only splits a spec into stages and
checks how they combine. Spec strings::

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
from dataclasses import dataclass

from fedsafe.compression.codec import CodecOptionError, Sparsifier, ValueCoder
from fedsafe.compression.floats import Float32Coder
from fedsafe.compression.registry import CODER_BY_NAME, SPARSIFIER_BY_NAME, valid_forms
from fedsafe.errors import UserError


class CompressionStage(enum.Enum):
    """Where in the client's pipeline compression is applied."""

    #: On the update produced by the DP optimizer (clipped and noised): post-processing.
    POST_PRIVATIZATION = "post_privatization"
    #: On the raw update before DP noise: refused, the DP analysis would not cover it.
    PRE_PRIVATIZATION = "pre_privatization"


@dataclass(frozen=True, slots=True)
class CompressionPipeline:
    """A validated compression pipeline: optional top-k or random-k, then one value codec.

    The codecs validate their own options when they are built (see
    :mod:`fedsafe.compression.codec`); the pipeline checks only how they combine.

    Parameters
    ----------
    sparsifier
        Top-k or random-k (:mod:`fedsafe.compression.registry`); None for dense.
    coder
        Coding of the sent values; float32 by default.

    Raises
    ------
    UserError
        If a flat (rotated) code is combined with a sparsifier, or an argument is not a codec.
    """

    sparsifier: Sparsifier | None = None
    coder: ValueCoder = Float32Coder()

    def __post_init__(self) -> None:
        if self.sparsifier is not None and not isinstance(self.sparsifier, Sparsifier):
            raise UserError(f"--compression: unknown sparsifier {self.sparsifier!r}")
        if not isinstance(self.coder, ValueCoder):
            raise UserError(f"--compression: unknown value codec {self.coder!r}")
        if self.coder.flat and self.sparsifier is not None:
            raise UserError(
                f"--compression: {self.coder.name} takes no sparsifier; use rsign:keep=F or "
                "rvq:bits=B to send fewer bits"
            )

    @property
    def is_identity(self) -> bool:
        """True for ``none``: updates go in Flower's plain ``ArrayRecord`` format."""
        return self.sparsifier is None and isinstance(self.coder, Float32Coder)

    @property
    def flat(self) -> bool:
        """True when the whole update is coded as one flat vector (``rsign``, ``rvq``)."""
        return self.coder.flat

    @property
    def needs_error_feedback(self) -> bool:
        """True when entries are dropped or the codec is biased (sign): keep a residual."""
        return self.sparsifier is not None or self.coder.needs_error_feedback

    @property
    def spec(self) -> str:
        """The canonical spec string (``parse_compression(p.spec) == p``)."""
        parts = [self.sparsifier.spec] if self.sparsifier is not None else []
        if not isinstance(self.coder, Float32Coder):
            parts.append(self.coder.spec)
        return "+".join(parts) if parts else "none"


def _bad(spec: str, why: str) -> UserError:
    return UserError(f"--compression {spec!r}: {why}. Valid forms: {valid_forms()}")


def parse_compression(spec: str) -> CompressionPipeline:
    """Parse a ``--compression`` spec string: ``[sparsifier:F+]coder[:key=value,...]``.

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
    sparsifier: Sparsifier | None = None
    coder: ValueCoder | None = None
    try:
        for position, stage in enumerate(text.split("+")):
            name, _, argument = stage.partition(":")
            name = name.strip()
            if name in SPARSIFIER_BY_NAME:
                if position != 0:
                    raise _bad(spec, f"{name} must be the first stage (one sparsifier at most)")
                sparsifier = SPARSIFIER_BY_NAME[name].from_argument(argument)
            elif name in CODER_BY_NAME:
                if coder is not None:
                    raise _bad(spec, f"at most one value codec ({', '.join(CODER_BY_NAME)})")
                coder = CODER_BY_NAME[name].from_options(argument)
            elif name == "none":
                raise _bad(spec, "'none' cannot be combined with other stages")
            else:
                raise _bad(spec, f"unknown stage {name!r}")
        return CompressionPipeline(sparsifier, coder if coder is not None else Float32Coder())
    except CodecOptionError as error:
        raise _bad(spec, str(error)) from None
    except UserError as error:
        if str(error).startswith("--compression '"):
            raise
        raise _bad(spec, str(error).removeprefix("--compression: ")) from None


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
    if pipeline.needs_error_feedback or not pipeline.coder.downlink:
        raise UserError(
            f"--downlink-compression {pipeline.spec}: sparsifiers, sign, rsign and rvq would drop, "
            "bias or blur the global model's weights; use none, float16, int8 or int4"
        )
