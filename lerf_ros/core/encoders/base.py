"""Encoder contracts, ``"module:factory"`` loading and output validation.

Any importable factory ``factory(device=..., **kwargs)`` returning an object that satisfies one of
the protocols below can be plugged in; the built-ins are named the same way, e.g.
``"lerf_ros.core.encoders.openclip:openclip_encoder"``. ``name`` is part of every cache key, so it
must change whenever the weights or the preprocessing change.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

# Unit-norm tolerance: fp16 encoders renormalised in fp32 land within ~1e-3 of 1.
NORM_TOL = 1e-2


class MissingWeightsError(FileNotFoundError, ValueError):
    """Model weights are not on this machine; the message names the paths searched. No download is tried."""


@runtime_checkable
class VisionLanguageEncoder(Protocol):
    name: str
    dim: int
    input_size: int  # crops are resized to input_size x input_size before encode_images

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) float RGB in [0, 1] -> (B, dim) unit norm. The pyramid hands fp32 crops on the CPU
        and fp16 channels-last ones on CUDA (`pyramid.crop_batch_format`): cast to what the model needs."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """T strings -> (T, dim) unit norm."""
        ...


@runtime_checkable
class DenseEncoder(Protocol):
    name: str
    dim: int

    def encode_dense(self, image: Tensor) -> Tensor:
        """(3, H, W) float RGB in [0, 1] -> (dim, h, w) features on a patch grid."""
        ...


@dataclass(frozen=True)
class EncoderSpec:
    """Which factory builds an encoder: ``target = "package.module:factory"`` plus keyword arguments.

    kwargs is a tuple of (name, value) pairs so the spec stays hashable and serialisable.
    """

    target: str
    kwargs: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        module, sep, attr = self.target.partition(":")
        if not sep or not module or not attr or any(not p.isidentifier() for p in module.split(".")):
            raise ValueError(f"encoder target must be 'package.module:factory', got {self.target!r}")
        if not attr.isidentifier():
            raise ValueError(f"encoder factory name must be an identifier, got {attr!r}")
        for item in self.kwargs:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"encoder kwargs must be (name, value) pairs, got {item!r}")
            if item[0] == "device":
                raise ValueError("encoder kwargs must not contain 'device'; it is passed separately")

    @classmethod
    def from_string(cls, text: str, kwargs: dict[str, object] | None = None) -> EncoderSpec:
        """``"package.module:factory"`` (surrounding whitespace ignored) + optional keyword arguments."""
        if not isinstance(text, str):
            raise ValueError(f"encoder spec must be a string, got {text!r}")
        return cls(text.strip(), tuple(sorted((kwargs or {}).items())))

    def to_string(self) -> str:
        return self.target

    def kwargs_dict(self) -> dict[str, object]:
        return dict(self.kwargs)


def _import_factory(spec: EncoderSpec):
    module_name, _, attr = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"encoder module {module_name!r} cannot be imported: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"encoder factory {attr!r} not found (or not callable) in {module_name!r}")
    return factory


def _check_attrs(encoder: object, target: str, dense: bool) -> None:
    name = getattr(encoder, "name", None)
    dim = getattr(encoder, "dim", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder from {target!r} has no non-empty string 'name' (got {name!r})")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"encoder {name!r} must have an integer dim >= 1, got {dim!r}")
    if dense:
        if not callable(getattr(encoder, "encode_dense", None)):
            raise ValueError(f"encoder {name!r} has no encode_dense method")
        return
    size = getattr(encoder, "input_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"encoder {name!r} must have an integer input_size >= 1, got {size!r}")
    for method in ("encode_images", "encode_texts"):
        if not callable(getattr(encoder, method, None)):
            raise ValueError(f"encoder {name!r} has no {method} method")


def _check_unit(out: Tensor, name: str, what: str, rows: int, dim: int) -> Tensor:
    if not isinstance(out, Tensor):
        raise ValueError(f"encoder {name!r} {what} returned {type(out).__name__}, expected a Tensor")
    if tuple(out.shape) != (rows, dim):
        raise ValueError(
            f"encoder {name!r} {what} returned shape {tuple(out.shape)}, expected ({rows}, {dim})"
        )
    if not torch.isfinite(out).all():
        raise ValueError(f"encoder {name!r} {what} returned non-finite values")
    if rows:
        norms = out.float().norm(dim=1)
        worst = float((norms - 1).abs().max())
        if worst > NORM_TOL:
            raise ValueError(
                f"encoder {name!r} {what} returned non-unit vectors (|norm - 1| up to {worst:.3g})"
            )
    return out


def checked_encode_images(encoder: VisionLanguageEncoder, images: Tensor) -> Tensor:
    """encode_images with its output checked: (B, dim), finite, unit norm; ValueError naming the encoder."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, S, S), got shape {tuple(images.shape)}")
    out = encoder.encode_images(images)
    return _check_unit(out, encoder.name, "encode_images", images.shape[0], encoder.dim)


def checked_encode_texts(encoder: VisionLanguageEncoder, texts: Sequence[str]) -> Tensor:
    """encode_texts with its output checked: (T, dim), finite, unit norm; ValueError naming the encoder."""
    if isinstance(texts, str):
        raise ValueError(f"texts must be a sequence of strings, got the string {texts!r}")
    texts = list(texts)
    out = encoder.encode_texts(texts)
    return _check_unit(out, encoder.name, "encode_texts", len(texts), encoder.dim)


def checked_encode_dense(encoder: DenseEncoder, image: Tensor) -> Tensor:
    """encode_dense with its output checked: (dim, h, w) with h, w ≥ 1 and finite."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    out = encoder.encode_dense(image)
    if not isinstance(out, Tensor) or out.ndim != 3 or out.shape[0] != encoder.dim or min(out.shape) < 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"encoder {encoder.name!r} encode_dense returned {shape}, expected ({encoder.dim}, h, w)"
        )
    if not torch.isfinite(out).all():
        raise ValueError(f"encoder {encoder.name!r} encode_dense returned non-finite values")
    return out


def load_encoder(spec: EncoderSpec | str, device: str | torch.device = "cpu", dense: bool = False):
    """Import ``spec.target``, call ``factory(device=device, **kwargs)`` and validate the result.

    A test encode checks the output shapes and unit norm (VisionLanguageEncoder: two grey images and
    two texts; DenseEncoder: one small image). Raises ValueError naming the encoder on any mismatch.
    """
    if isinstance(spec, str):
        spec = EncoderSpec.from_string(spec)
    factory = _import_factory(spec)
    encoder = factory(device=device, **spec.kwargs_dict())
    _check_attrs(encoder, spec.target, dense)
    dev = torch.device(device)
    with torch.no_grad():
        if dense:
            checked_encode_dense(encoder, torch.full((3, 64, 64), 0.5, device=dev))
        else:
            s = encoder.input_size
            probe = torch.linspace(0.2, 0.8, 2, device=dev).reshape(2, 1, 1, 1).expand(2, 3, s, s)
            checked_encode_images(encoder, probe.contiguous())
            checked_encode_texts(encoder, ["a photo of an object", "red"])
    return encoder
