"""A TEST encoder whose relevancy statistics look like real OpenCLIP's, not like a perfect classifier.

The demo colour encoder (``lerf_ros.core.encoders.demo``) scores 0.98+ for the named colour and 0.05-0.27
for anything else: no real model separates concepts that cleanly. In LERF's relevancy maps with OpenCLIP
ViT-B/16 the target peaks around 0.6-0.7, the background sits near 0.5 and related concepts ("orange" on a
red mug, "purple" on magenta) reach 0.55-0.6. This encoder reproduces those numbers on synthetic scenes
whose objects are named by colour, so that the query code can be tested where the margins are small.

Concepts are the demo palette's colour names (hue for chromatic pixels, brightness for white / grey /
black, via `colour_memberships`). With LERF relevancy against the canonical negatives at τ = 10:

- a crop filled by the named concept:          ~0.66 (``TARGET_RELEVANCY``)
- a crop filled by a RELATED concept (below):  ~0.58 (``RELATED_RELEVANCY``)
- unrelated content:                           ~0.50
- plus a little deterministic, content-dependent noise (a fixed random projection of the crop's
  coarse colour layout), std ~0.01 in relevancy.

Construction: every embedding has a large shared "generic" component g, as CLIP embeddings do. An
image embedding is ``normalize(β (s + ρ A s) + g + noise)`` with s the crop's colour composition and A
the RELATED adjacency; a text embedding is ``√(1-b²) e + b g`` with e the unit vector of its colour
words, or of a private hashed direction for text without one (the canonical negatives, "chair", ...).
Images never have private components, so unrelated text and negatives tie (0.5); β and ρ are solved in
closed form for the two relevancy targets. Shape words are ignored: "red box" and "red" embed alike.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lerf_ros.core.encoders.demo import CHROMATIC, COLOUR_NAMES, SYNONYMS, colour_memberships

#: The declared look-alike pairs (both directions are related): hue neighbours on the colour circle and
#: neighbouring greys. Tests and benchmarks name look-alikes from this table.
RELATED_PAIRS: tuple[tuple[str, str], ...] = (
    *((CHROMATIC[i][0], CHROMATIC[(i + 1) % len(CHROMATIC)][0]) for i in range(len(CHROMATIC))),
    ("white", "grey"),
    ("grey", "black"),
)

TARGET_RELEVANCY = 0.66
RELATED_RELEVANCY = 0.575
TEMPERATURE = 10.0  # the relevancy temperature the targets are solved for (QueryConfig.temperature)

_WORD = re.compile(r"[a-z]+")
_N_CONCEPTS = len(COLOUR_NAMES)


def related(name: str) -> tuple[str, ...]:
    """Concepts declared related to ``name`` (RELATED_PAIRS, either direction)."""
    return tuple(b if a == name else a for a, b in RELATED_PAIRS if name in (a, b))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class ClipLikeEncoder:
    """TEST VisionLanguageEncoder with CLIP-like relevancy statistics (module docstring)."""

    def __init__(self, device: str | torch.device = "cpu", dim: int = 64, input_size: int = 16,
                 target_relevancy: float = TARGET_RELEVANCY, related_relevancy: float = RELATED_RELEVANCY,
                 noise: float = 0.004, text_generic: float = 0.5, seed: int = 0):
        n_private = dim - _N_CONCEPTS - 1 - 16
        if n_private < 8:
            raise ValueError(f"dim must be >= {_N_CONCEPTS + 25}, got {dim}")
        if not 0.5 < related_relevancy < target_relevancy < 1.0:
            raise ValueError(f"need 0.5 < related_relevancy < target_relevancy < 1, got "
                             f"{related_relevancy}, {target_relevancy}")
        if not (0.0 < text_generic < 1.0 and noise >= 0.0):
            raise ValueError(f"need 0 < text_generic < 1 and noise >= 0, got {text_generic}, {noise}")
        self.device = torch.device(device)
        self.dim, self.input_size = int(dim), int(input_size)
        self.generic = _N_CONCEPTS
        self.private0, self.n_private = _N_CONCEPTS + 1, n_private
        self.noise0 = self.private0 + n_private
        self.text_generic = float(text_generic)
        k = math.sqrt(1.0 - text_generic**2)
        self.rho = _logit(related_relevancy) / _logit(target_relevancy)
        adj = torch.zeros(_N_CONCEPTS, _N_CONCEPTS)
        for a, b in RELATED_PAIRS:
            i, j = COLOUR_NAMES.index(a), COLOUR_NAMES.index(b)
            adj[i, j] = adj[j, i] = 1.0
        self.mix = (torch.eye(_N_CONCEPTS) + self.rho * adj).to(self.device)  # s -> s + ρ A s
        # Pure crop of concept c: φ ∝ β (e_c + ρ Σ_r e_r) + g, so φ·t_c - φ·t_neg = k β / |β m + g| = d.
        d = _logit(target_relevancy) / TEMPERATURE
        m2 = float(1.0 + self.rho**2 * adj.sum(1).max())
        self.beta = d / math.sqrt(max(k * k - d * d * m2, 1e-12))
        gen = torch.Generator().manual_seed(int(seed))
        # Content-dependent noise: a fixed projection of the crop's 4 x 4 colour layout onto the concept
        # and noise dimensions (the same crop always gets the same noise, similar crops similar noise).
        self.proj = (torch.randn(48, _N_CONCEPTS + 16, generator=gen) * noise / math.sqrt(48 * 0.05)).to(
            self.device)
        self.name = (f"test-cliplike-v1(dim={dim},t={target_relevancy:g},r={related_relevancy:g},"
                     f"noise={noise:g},b={text_generic:g},seed={seed})")

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) RGB [0, 1] -> (B, dim) unit."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got shape {tuple(images.shape)}")
        x = images.to(self.device).float().clamp(0.0, 1.0)
        comp = colour_memberships(x).mean(dim=(2, 3))  # (B, concepts), sums to 1
        out = torch.zeros(x.shape[0], self.dim, device=self.device)
        out[:, :_N_CONCEPTS] = self.beta * comp @ self.mix
        out[:, self.generic] = 1.0
        layout = F.adaptive_avg_pool2d(x, 4).reshape(x.shape[0], 48)
        n = (layout - 0.5) @ self.proj
        out[:, :_N_CONCEPTS] += n[:, :_N_CONCEPTS]
        out[:, self.noise0:self.noise0 + 16] += n[:, _N_CONCEPTS:]
        return F.normalize(out, dim=1)

    def concepts(self, text: str) -> list[str]:
        """Palette names mentioned in text ("Light-gray box" -> ["grey"])."""
        words = (SYNONYMS.get(w, w) for w in _WORD.findall(text.lower()))
        return [w for w in words if w in COLOUR_NAMES]

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """T strings -> (T, dim) unit."""
        k = math.sqrt(1.0 - self.text_generic**2)
        out = torch.zeros(len(texts), self.dim, device=self.device)
        for i, text in enumerate(texts):
            names = sorted(set(self.concepts(text)))
            if names:
                for name in names:
                    out[i, COLOUR_NAMES.index(name)] = k / math.sqrt(len(names))
            else:
                h = int.from_bytes(hashlib.sha1(text.strip().lower().encode()).digest()[:4], "little")
                out[i, self.private0 + h % self.n_private] = k
            out[i, self.generic] = self.text_generic
        return F.normalize(out, dim=1)


cliplike_encoder = ClipLikeEncoder


def cliplike_hard_encoder(device: str | torch.device = "cpu", **kwargs) -> ClipLikeEncoder:
    """A harder CLIP-like encoder for robustness benchmarks: the target's relevancy 0.59-0.63 instead of
    ~0.66, related concepts 0.55-0.59, and about three times the content-dependent noise (std ~0.015 in
    relevancy), so that a target and its look-alike are ~0.04 apart, not ~0.085."""
    settings = {"target_relevancy": 0.62, "related_relevancy": 0.58, "noise": 0.012, **kwargs}
    return ClipLikeEncoder(device, **settings)
