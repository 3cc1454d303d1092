"""Multi-resolution hash encoding (instant-ngp), tinycudann or pure PyTorch, one interface.

The PyTorch backend reproduces tinycudann's HashGrid (same parameter layout, level scales, +0.5
vertex offset, dense indexing while a level fits its table, coherent prime hash otherwise, linear
interpolation), so the flat parameter vector of one backend loaded into the other gives the same
output up to float rounding; the CUDA test checks it. One deliberate difference: on a dense level,
within half a cell of the unit cube's upper faces, tinycudann's +1 vertex runs past the grid and its
row index wraps into the next grid row (an artefact); the torch backend clamps to the border there.
With the scene contraction that region is the shell at (near) infinite distance.

A third backend, the fused Triton kernel in `hash_triton` ("triton"), computes exactly the torch
backend's lookup (border clamp included) in one launch for all levels; it holds the same ``params``.
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
#: Accepted ``implementation`` values (HashEncodingConfig; MLPConfig runs "triton" as torch).
IMPLEMENTATIONS = ("auto", "torch", "tcnn", "triton")


@dataclass(frozen=True)
class HashEncodingConfig:
    """num_levels L, features_per_level F, table size 2**log2_hashmap_size entries per level,
    resolutions growing geometrically from base_resolution to max_resolution (cells across [0, 1])."""

    num_levels: int = 8
    features_per_level: int = 2
    log2_hashmap_size: int = 15
    base_resolution: int = 16
    max_resolution: int = 256
    implementation: str = "auto"  # "auto" | "torch" | "tcnn" | "triton" (see resolve_implementation)

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
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be auto, torch, tcnn or triton, got {self.implementation!r}"
            )
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


def _log_once(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _BACKEND_LOGGED:
        _BACKEND_LOGGED.add(key)
        _LOG.log(level, message)


def triton_problem(features_per_level: int = 2) -> str | None:
    """None when the fused Triton hash grid runs here (CUDA, triton imports, the kernels compile for
    this F and match the PyTorch backend on the current GPU; checked once per F and GPU), else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from . import hash_triton  # imports triton: shipped with CUDA torch builds, absent from CPU ones
    except ImportError as exc:
        return f"triton does not import ({type(exc).__name__}: {exc})"
    return hash_triton.probe(features_per_level, f"cuda:{torch.cuda.current_device()}")


def resolve_implementation(requested: str, features_per_level: int = 2, encoding: bool = True) -> str:
    """The backend to build: "auto" -> "tcnn" when tinycudann imports and CUDA is available, else
    "triton" when `triton_problem` finds none, else "torch" (a warning says why Triton was skipped on a
    CUDA machine). An explicit "tcnn" / "triton" that cannot run raises ValueError at construction.

    ``encoding=False`` (MLPs): Triton here is the hash grid only, so "triton" resolves to "torch" and
    "auto" never probes it.
    """
    if requested == "torch" or (requested == "triton" and not encoding):
        return "torch"
    tcnn = import_tcnn() if requested in ("auto", "tcnn") and torch.cuda.is_available() else None
    if requested == "tcnn":
        if tcnn is None:
            raise ValueError(
                "implementation 'tcnn' requested but tinycudann is not importable or CUDA is not available; "
                "use 'auto' or 'torch'"
            )
        return "tcnn"
    if requested == "triton":
        problem = triton_problem(features_per_level)
        if problem is not None:
            raise ValueError(f"implementation 'triton' requested but {problem}; use 'auto' or 'torch'")
        _log_once("triton", "hash-grid backend: triton (fused kernel)")
        return "triton"
    choice = "tcnn" if tcnn is not None else "torch"
    if choice == "torch" and encoding and torch.cuda.is_available():
        problem = triton_problem(features_per_level)
        if problem is None:
            choice = "triton"
        else:
            _log_once(f"triton-skipped-{features_per_level}", f"Triton hash grid unusable ({problem}); "
                      "falling back to the PyTorch hash grid", logging.WARNING)
    kind = "hash-grid" if encoding else "MLP"
    _log_once(f"auto-{kind}-{choice}", f"neural-field {kind} backend: {choice}")
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
        self.implementation = resolve_implementation(config.implementation, config.features_per_level)
        scales, resolutions, sizes, offsets = level_layout(config)
        self.total_entries = offsets[-1] + sizes[-1]
        self._tcnn = None
        if self.implementation == "tcnn":
            tcnn = import_tcnn()
            module = tcnn.Encoding(
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
            # One parameter under one state key, "params", whatever the backend (`layouts`): the tinycudann
            # module is kept out of the module tree, so its handle on the same tensor is not saved twice.
            object.__setattr__(self, "_tcnn", module)
            self.params = module.params
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
        self._num_dense = k = len(hashed) - sum(hashed)
        strides = torch.tensor([[1, r, r * r] for r in resolutions[:k]], dtype=torch.int64).reshape(k, 3)
        bits = torch.tensor([[c >> 2 & 1, c >> 1 & 1, c & 1] for c in range(8)], dtype=torch.int64)
        self.register_buffer("_dense_strides", strides, persistent=False)  # (K, 3)
        self.register_buffer("_dense_corners", strides @ bits.T, persistent=False)  # (K, 8) row offsets
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
        if self.implementation == "triton":
            from . import hash_triton  # importable: resolve_implementation checked it

            # Same layout and numbers as the torch path, so a module moved to the CPU (a map loaded
            # there) keeps working through it; the interpreter (tests) runs the kernel on the CPU.
            if x.is_cuda or hash_triton.interpreting():
                table = self.params.view(self.total_entries, self.config.features_per_level)
                return hash_triton.hash_grid(x, table, hash_triton.grid_tensors(self))
        return self._forward_torch(x)

    @torch.no_grad()
    def corner_indices_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3) in [0, 1] -> table rows (L, 8, N) int64 and trilinear weights (L, 8, N).

        Corner c = 4 bx + 2 by + bz. Points are the LAST axis so every broadcast op runs over long
        contiguous rows (with points first, the innermost axis has length 2 and the CPU kernels
        crawl). Integer work is done on small per-level / per-axis tensors and combined by
        broadcasting. Levels are sorted by resolution: dense ones first, hashed ones last.
        """
        n, levels = x.shape[0], self.config.num_levels
        pos = self._scales[:, None, None] * x.T[None] + 0.5  # (L, 3, N)
        grid = torch.floor(pos)
        frac = pos - grid
        g = grid.long()
        idx = torch.empty(levels, 8, n, dtype=torch.long, device=x.device)
        k = self._num_dense
        if k > 0:
            # Dense: row = base vertex row + a per-level constant per corner. The last vertex layer
            # (floor = res - 1, within half a cell of the cube's upper faces) is clamped to the border;
            # tinycudann wraps it into the next row there instead (see module docstring).
            top = self._res[:k, None, None] - 2
            over = g[:k] > top
            frac[:k] = torch.where(over, torch.ones_like(frac[:k]), frac[:k])
            base = (torch.minimum(g[:k], top) * self._dense_strides[:, :, None]).sum(1)  # (K, N)
            base = base + self._offsets[:k, None]
            torch.add(base[:, None, :], self._dense_corners[:, :, None], out=idx[:k])
        if k < levels:
            # Hashed: (a ^ b ^ c) & m == (a & m) ^ (b & m) ^ (c & m), so mask the per-axis terms first.
            v = g[k:, :, None, :] + torch.arange(2, device=x.device)[:, None]  # (H, 3, 2, N)
            h = (v * self._primes[None, :, None, None]) & (self._sizes[k:, None, None, None] - 1)
            h = h.int()  # masked rows are < 2^24: int32 halves the memory traffic of the XORs
            xy = h[:, 0, :, None, :] ^ h[:, 1, None, :, :]  # (H, 2, 2, N)
            xyz = xy[:, :, :, None, :] ^ h[:, 2, None, None, :, :]  # (H, 2, 2, 2, N)
            torch.add(xyz, self._offsets[k:, None, None, None, None], out=idx.view(levels, 2, 2, 2, n)[k:])
        wx = torch.stack([1 - frac, frac], dim=2)  # (L, 3, 2, N)
        wxy = wx[:, 0, :, None, :] * wx[:, 1, None, :, :]
        w = wxy[:, :, :, None, :] * wx[:, 2, None, None, :, :]
        return idx, w.reshape(levels, 8, n)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.corner_indices_weights(x)
        table = self.params.view(self.total_entries, self.config.features_per_level)
        return _GridInterp.apply(table, idx, w)


class _GridInterp(torch.autograd.Function):
    """(table (T, F), idx (L, 8, N), w (L, 8, N)) -> (N, L*F) = sum over corners of w * table[idx].

    Gradient only into the table. A hand-written backward (one multiply + one index_add_) is ~2x
    faster on the CPU than autograd through index_select and the broadcast product, and saves only
    idx and w. Under CUDA autocast it runs in float32: table gradients are tiny and would underflow
    in float16.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, table, idx, w):
        levels, _, n = idx.shape
        feat = table.shape[1]
        vals = table.index_select(0, idx.reshape(-1)).view(levels, 8, n, feat)
        ctx.save_for_backward(idx, w)
        ctx.table_shape = table.shape
        out = (w[..., None] * vals).sum(dim=1)  # (L, N, F)
        return out.permute(1, 0, 2).reshape(n, levels * feat)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        idx, w = ctx.saved_tensors
        levels, _, n = idx.shape
        feat = ctx.table_shape[1]
        g = grad_out.reshape(n, levels, feat).permute(1, 0, 2)  # (L, N, F)
        grad_vals = (w[..., None] * g[:, None]).reshape(-1, feat)
        grad_table = torch.zeros(ctx.table_shape, dtype=grad_out.dtype, device=grad_out.device)
        grad_table.index_add_(0, idx.reshape(-1), grad_vals)
        return grad_table, None, None
