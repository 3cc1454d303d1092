"""Deterministic DEMO encoders: colour names instead of CLIP, colour statistics instead of DINO.

DEMO ONLY. These are not CLIP and know nothing but colour. They exist so that tests, the demo and
benchmarks can check end-to-end results (the "red box" must be found where the red box is)
without network access or model weights. Select them like any other encoder:
``"lerf_ros.core.encoders.demo:colour_name_encoder"``.

Image embedding (``colour_name_encoder``): the crop's colour composition over a palette of named
colours, plus a constant generic component. Chromatic pixels are named by hue (HSV), which Lambert
shading leaves unchanged, so an object at 50–100 % brightness keeps its name; unsaturated pixels
are white / grey / black by brightness. Text embedding: the colour words in the text ("the red
box" -> red, plus a little generic); text without a colour word (the canonical negatives
"object", "things", "stuff", "texture") embeds to the generic direction. With LERF relevancy
(τ = 10) a crop scores above 0.5 for a colour when that colour covers more than about a third of it
(share > generic_weight · (√(1 + tg²) − tg) = 0.33 with the defaults).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Hue prototypes in degrees (HSV). Orange/yellow meet at ~43°, so gold-ish yellows stay yellow.
CHROMATIC: tuple[tuple[str, float], ...] = (
    ("red", 0.0),
    ("orange", 30.0),
    ("yellow", 57.0),
    ("green", 120.0),
    ("cyan", 185.0),
    ("blue", 228.0),
    ("purple", 275.0),
    ("magenta", 308.0),
    ("pink", 338.0),
)
ACHROMATIC: tuple[str, ...] = ("white", "grey", "black")
COLOUR_NAMES: tuple[str, ...] = tuple(n for n, _ in CHROMATIC) + ACHROMATIC
SYNONYMS: dict[str, str] = {
    "gray": "grey",
    "violet": "purple",
    "fuchsia": "magenta",
    "aqua": "cyan",
    "turquoise": "cyan",
}
# Brown is deliberately absent: it is dark orange, and shading alone would rename orange things.

_WORD = re.compile(r"[a-z]+")


def rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(..., 3, H, W) RGB in [0, 1] -> hue in degrees [0, 360), saturation, value, each (..., H, W)."""
    r, g, b = images.unbind(-3)
    v, _ = images.max(dim=-3)
    mn, _ = images.min(dim=-3)
    d = v - mn
    safe_d = torch.where(d > 0, d, torch.ones_like(d))
    h = torch.where(
        v == r,
        torch.remainder((g - b) / safe_d, 6.0),
        torch.where(v == g, (b - r) / safe_d + 2.0, (r - g) / safe_d + 4.0),
    )
    h = torch.where(d > 0, h * 60.0, torch.zeros_like(h))
    s = torch.where(v > 0, d / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return h, s, v


def _ramp(x: Tensor, lo: float, hi: float) -> Tensor:
    """Smooth 0 -> 1 step between lo and hi."""
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def colour_memberships(images: Tensor, hue_sigma_deg: float = 10.0) -> Tensor:
    """Per-pixel soft colour names: (B, 3, H, W) RGB [0, 1] -> (B, len(COLOUR_NAMES), H, W), summing to 1."""
    h, s, v = rgb_to_hsv(images.float().clamp(0.0, 1.0))
    chroma = _ramp(s, 0.2, 0.4) * _ramp(v, 0.1, 0.22)  # how much the pixel has a hue worth naming
    protos = torch.tensor([p for _, p in CHROMATIC], device=images.device)
    diff = torch.remainder(h.unsqueeze(1) - protos.reshape(1, -1, 1, 1) + 180.0, 360.0) - 180.0
    hue_w = torch.softmax(-(diff**2) / (2.0 * hue_sigma_deg**2), dim=1)
    black = 1.0 - _ramp(v, 0.06, 0.16)
    white = _ramp(v, 0.62, 0.78)
    grey = (1.0 - black - white).clamp(min=0.0)
    achro = torch.stack([white, grey, black], dim=1)
    return torch.cat([chroma.unsqueeze(1) * hue_w, (1.0 - chroma).unsqueeze(1) * achro], dim=1)


class ColourNameEncoder:
    """DEMO VisionLanguageEncoder over colour names (module docstring). Deterministic, no weights."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dim: int = 16,
        input_size: int = 16,
        generic_weight: float = 0.4,
        text_generic_weight: float = 0.2,
        hue_sigma_deg: float = 10.0,
    ):
        n = len(COLOUR_NAMES) + 1
        if dim < n:
            raise ValueError(f"dim must be >= {n} (colour names + generic), got {dim}")
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        if not (generic_weight > 0 and text_generic_weight >= 0 and hue_sigma_deg > 0):
            raise ValueError(
                f"weights must be positive, got generic_weight={generic_weight}, "
                f"text_generic_weight={text_generic_weight}, hue_sigma_deg={hue_sigma_deg}"
            )
        self.device = torch.device(device)
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.generic_weight = float(generic_weight)
        self.text_generic_weight = float(text_generic_weight)
        self.hue_sigma_deg = float(hue_sigma_deg)
        self.generic_index = len(COLOUR_NAMES)
        # Extra dims beyond the palette stay zero: they let the demo stand in for an encoder of a given width.
        self.name = (
            f"demo-colour-names-v1(dim={dim},g={generic_weight:g},tg={text_generic_weight:g},"
            f"sigma={hue_sigma_deg:g})"
        )

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) RGB [0, 1] -> (B, dim) unit: colour composition + generic weight."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got shape {tuple(images.shape)}")
        comp = colour_memberships(images.to(self.device), self.hue_sigma_deg).mean(dim=(2, 3))
        out = torch.zeros(images.shape[0], self.dim, device=self.device)
        out[:, : len(COLOUR_NAMES)] = comp
        out[:, self.generic_index] = self.generic_weight
        return F.normalize(out, dim=1)

    def colour_words(self, text: str) -> list[str]:
        """Palette names mentioned in text, in order ("Light-gray box" -> ["grey"])."""
        words = (SYNONYMS.get(w, w) for w in _WORD.findall(text.lower()))
        return [w for w in words if w in COLOUR_NAMES]

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """T strings -> (T, dim) unit: mentioned colours (+ a little generic), else the generic direction."""
        out = torch.zeros(len(texts), self.dim, device=self.device)
        for i, text in enumerate(texts):
            names = self.colour_words(text)
            if not names:
                out[i, self.generic_index] = 1.0
                continue
            for name in set(names):
                out[i, COLOUR_NAMES.index(name)] = 1.0 / math.sqrt(len(set(names)))
            out[i, self.generic_index] = self.text_generic_weight
        return F.normalize(out, dim=1)


# The "module:factory" strings name these; a class is a factory with the constructor's signature, so the
# arguments are declared once.
colour_name_encoder = ColourNameEncoder


class ColourDenseEncoder:
    """DEMO DenseEncoder: per-patch colour and gradient statistics (a stand-in for DINO, not DINO).

    Channels (dim = 8): mean R, G, B, saturation, value; luminance std; mean |d/dx|, |d/dy| of
    luminance, the last three scaled by 4 so all channels span similar ranges. The image is first
    resized to a whole number of patches, so feature cell (i, j) covers an equal share of the image.
    """

    dim = 8

    def __init__(self, device: str | torch.device = "cpu", patch: int = 8):
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.device = torch.device(device)
        self.patch = int(patch)
        self.name = f"demo-colour-dense-v1(patch={patch})"

    def encode_dense(self, image: Tensor) -> Tensor:
        """(3, H, W) RGB [0, 1] -> (8, h, w) with h = max(1, round(H / patch)), likewise w."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
        p = self.patch
        h = max(1, round(image.shape[1] / p))
        w = max(1, round(image.shape[2] / p))
        x = image.to(self.device).float().clamp(0.0, 1.0).unsqueeze(0)
        if (h * p, w * p) != tuple(image.shape[1:]):
            x = F.interpolate(x, size=(h * p, w * p), mode="bilinear", align_corners=False, antialias=True)
        _, s, v = rgb_to_hsv(x)
        lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        dx = F.pad((lum[..., :, 1:] - lum[..., :, :-1]).abs(), (0, 1, 0, 0))
        dy = F.pad((lum[..., 1:, :] - lum[..., :-1, :]).abs(), (0, 0, 0, 1))
        mean_lum = F.avg_pool2d(lum, p)
        std_lum = (F.avg_pool2d(lum**2, p) - mean_lum**2).clamp(min=0.0).sqrt()
        feats = torch.cat(
            [
                F.avg_pool2d(x, p),
                F.avg_pool2d(s.unsqueeze(1), p),
                F.avg_pool2d(v.unsqueeze(1), p),
                4.0 * std_lum,
                4.0 * F.avg_pool2d(dx, p),
                4.0 * F.avg_pool2d(dy, p),
            ],
            dim=1,
        )
        return feats[0]


colour_dense_encoder = ColourDenseEncoder
