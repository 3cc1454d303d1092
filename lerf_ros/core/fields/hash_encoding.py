"""Multi-resolution hash encoding (instant-ngp), tinycudann or pure PyTorch, one interface.

The PyTorch backend reproduces tinycudann's HashGrid exactly (same parameter layout, level
scales, +0.5 vertex offset, dense indexing while a level fits its table, coherent prime hash
otherwise, linear interpolation), so the flat parameter vector of one backend loaded into the
other gives the same output up to float rounding. That is what the CUDA comparison test checks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

_LOG = logging.getLogger(__name__)
_PRIMES = (1, 2654435761, 805459861)
_UINT32 = 0xFFFFFFFF
_BACKEND_LOGGED: set[str] = set()


@dataclass(frozen=True)
class HashEncodingConfig:
    """num_levels L, features_per_level F, table size 2**log2_hashmap_size entries per level,
    resolutions growing geometrically from base_resolution to max_resolution (cells across [0, 1])."""

    num_levels: int = 8
    features_per_level: int = 2
    log2_hashmap_size: int = 15
    base_resolution: int = 16
    max_resolution: int = 256
    implementation: str = "auto"  # "auto" | "torch" | "tcnn"

    def validate(self) -> HashEncodingConfig:
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.features_per_level not in (1, 2, 4, 8):
            raise ValueError(f"features_per_level must be 1, 2, 4 or 8, got {self.features_per_level}")
        if not 4 <= self.log2_hashmap_size <= 24:
            raise ValueError(f"log2_hashmap_size must be in [4, 24], got {self.log2_hashmap_size}")
        if self.base_resolution < 2 or self.max_resolution < self.base_resolution:
            raise ValueError(
                f"need 2 <= base_resolution <= max_resolution, "
                f"got {self.base_resolution}, {self.max_resolution}"
            )
        if self.implementation not in ("auto", "torch", "tcnn"):
            raise ValueError(f"implementation must be auto, torch or tcnn, got {self.implementation!r}")
        return self

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    @property
    def per_level_scale(self) -> float:
        if self.num_levels == 1:
            return 1.0
        ratio = math.log(self.max_resolution) - math.log(self.base_resolution)
        return math.exp(ratio / (self.num_levels - 1))


def import_tcnn():
    """Return the tinycudann module, or None when it cannot be used (not installed, or no CUDA driver)."""
    try:
        import tinycudann  # optional, heavy, needs CUDA: imported only when asked for
    except (ImportError, OSError) as exc:  # OSError / EnvironmentError: installed but no usable CUDA
        _log_once("tcnn-missing", f"tinycudann unavailable ({type(exc).__name__}: {exc}); using PyTorch")
        return None
    return tinycudann


def _log_once(key: str, message: str) -> None:
    if key not in _BACKEND_LOGGED:
        _BACKEND_LOGGED.add(key)
        _LOG.info(message)


def resolve_implementation(requested: str) -> str:
    """"auto" -> "tcnn" when tinycudann imports and CUDA is available, else "torch"; "tcnn" must work."""
    if requested == "torch":
        return "torch"
    tcnn = import_tcnn() if torch.cuda.is_available() else None
    if requested == "tcnn":
        if tcnn is None:
            raise ValueError(
                "implementation 'tcnn' requested but tinycudann is not importable or CUDA is not available; "
                "use 'auto' or 'torch'"
            )
        return "tcnn"
    choice = "tcnn" if tcnn is not None else "torch"
    _log_once(f"auto-{choice}", f"neural-field backend: {choice}")
    return choice


def level_layout(config: HashEncodingConfig) -> tuple[list[float], list[int], list[int], list[int]]:
    """Per level: scale, vertex resolution, table entries, entry offset (tinycudann's HashGrid layout)."""
    log2_scale = math.log2(config.per_level_scale)
    scales, resolutions, sizes, offsets = [], [], [], []
    offset = 0
    for level in range(config.num_levels):
        scale = 2.0 ** (level * log2_scale) * config.base_resolution - 1.0
        res = math.ceil(scale) + 1
        size = min(res**3, 2**31 - 1)
        size = (size + 7) // 8 * 8  # aligned, as tinycudann
        size = min(size, 2**config.log2_hashmap_size)
        scales.append(scale)
        resolutions.append(res)
        sizes.append(size)
        offsets.append(offset)
        offset += size
    return scales, resolutions, sizes, offsets


class HashEncoding(nn.Module):
    """forward(x (N, 3) in [0, 1]) -> (N, L*F) float32, level-major (level l at columns l*F:(l+1)*F).

    ``params`` is the flat table (total_entries * F,), initialised uniform in [-1e-4, 1e-4] as
    instant-ngp. Inputs outside [0, 1] are clamped.
    """

    def __init__(self, config: HashEncodingConfig):
        super().__init__()
        self.config = config.validate()
        self.implementation = resolve_implementation(config.implementation)
        scales, resolutions, sizes, offsets = level_layout(config)
        self.total_entries = offsets[-1] + sizes[-1]
        self._tcnn = None
        if self.implementation == "tcnn":
            tcnn = import_tcnn()
            self._tcnn = tcnn.Encoding(
                n_input_dims=3,
                encoding_config={
                    "otype": "HashGrid",
                    "n_levels": config.num_levels,
                    "n_features_per_level": config.features_per_level,
                    "log2_hashmap_size": config.log2_hashmap_size,
                    "base_resolution": config.base_resolution,
                    "per_level_scale": config.per_level_scale,
                    "interpolation": "Linear",
                },
                dtype=torch.float32,
            )
            # tinycudann owns the parameter; expose it under the same name for checkpoints.
            self.params = self._tcnn.params
        else:
            self.params = nn.Parameter(torch.empty(self.total_entries * config.features_per_level))
            nn.init.uniform_(self.params, -1e-4, 1e-4)
        self.register_buffer("_scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.register_buffer("_res", torch.tensor(resolutions, dtype=torch.int64), persistent=False)
        self.register_buffer("_sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        # A level is hashed when its dense vertex grid does not fit its table (tinycudann's rule).
        hashed = [res**3 > size for res, size in zip(resolutions, sizes, strict=True)]
        if any(hashed[i] and not hashed[i + 1] for i in range(len(hashed) - 1)):
            raise ValueError(f"hash levels must follow dense ones, got hashed={hashed}")
        self._num_dense = len(hashed) - sum(hashed)
        self.register_buffer("_primes", torch.tensor(_PRIMES, dtype=torch.int64), persistent=False)

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != 3:
            raise ValueError(f"HashEncoding expects (N, 3) positions, got {tuple(x.shape)}")
        x = x.float().clamp(0.0, 1.0)
        if self._tcnn is not None:
            return self._tcnn(x).float()
        return self._forward_torch(x)

    @torch.no_grad()
    def corner_indices_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3) in [0, 1] -> table rows (N, L, 8) int64 and trilinear weights (N, L, 8).

        Corner c = 4 bx + 2 by + bz. Works per axis on the two candidate vertices (N, L, 3, 2) and
        combines the 8 corners by broadcasting (~3x fewer integer ops than materialising corner
        coordinates). Levels are sorted by resolution, so dense levels come first, hashed ones last.
        """
        n, levels = x.shape[0], self.config.num_levels
        pos = x[:, None, :] * self._scales[None, :, None] + 0.5  # (N, L, 3)
        grid = torch.floor(pos)
        frac = pos - grid
        v = grid.long()[..., None] + torch.arange(2, device=x.device)  # (N, L, 3, 2)
        k = self._num_dense
        parts = []
        if k > 0:
            res = self._res[None, :k, None]
            d = v[:, :k] * torch.stack([torch.ones_like(res), res, res * res], dim=2)  # per-axis strides
            d = d[:, :, 0, :, None, None] + d[:, :, 1, None, :, None] + d[:, :, 2, None, None, :]
            # The +1 vertex may step one past the grid; like tinycudann, wrap modulo the table size
            # (the index is < 2 * size, so one conditional subtraction is the modulo).
            size = self._sizes[None, :k, None, None, None]
            parts.append(torch.where(d >= size, d - size, d))
        if k < levels:
            h = v[:, k:] * self._primes[None, None, :, None]
            h = h[:, :, 0, :, None, None] ^ h[:, :, 1, None, :, None] ^ h[:, :, 2, None, None, :]
            parts.append(h & (self._sizes[None, k:, None, None, None] - 1))  # hashed sizes are powers of 2
        idx = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        idx = idx.view(n, levels, 8) + self._offsets[None, :, None]
        wx = torch.stack([1 - frac, frac], dim=-1)  # (N, L, 3, 2)
        w = wx[:, :, 0, :, None, None] * wx[:, :, 1, None, :, None] * wx[:, :, 2, None, None, :]
        return idx, w.reshape(n, levels, 8)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.corner_indices_weights(x)
        table = self.params.view(self.total_entries, self.config.features_per_level)
        return _GridInterp.apply(table, idx, w).reshape(x.shape[0], -1)


class _GridInterp(torch.autograd.Function):
    """out (N, L, F) = sum over 8 corners of w * table[idx]; gradient only into the table.

    A hand-written backward (one multiply + one index_add_) is ~2x faster on the CPU than autograd
    through index_select and the broadcast product, and saves only idx and w. Under CUDA autocast it
    runs in float32: table gradients are tiny and would underflow in float16.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, table, idx, w):
        n, levels, _ = idx.shape
        vals = table.index_select(0, idx.reshape(-1)).view(n, levels, 8, -1)
        ctx.save_for_backward(idx, w)
        ctx.table_shape = table.shape
        return torch.einsum("nlc,nlcf->nlf", w, vals) if vals.shape[-1] > 2 else (w[..., None] * vals).sum(2)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        idx, w = ctx.saved_tensors
        grad_vals = (w[..., None] * grad_out[:, :, None, :]).reshape(-1, grad_out.shape[-1])
        grad_table = torch.zeros(ctx.table_shape, dtype=grad_out.dtype, device=grad_out.device)
        grad_table.index_add_(0, idx.reshape(-1), grad_vals)
        return grad_table, None, None
