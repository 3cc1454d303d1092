"""Fused multi-resolution hash grid in Triton: every level in one launch, forward and backward.

Same parameter layout and lookup rule as the PyTorch backend in `hash_encoding` (tinycudann's HashGrid:
per-level scale, +0.5 vertex offset, dense rows while a level fits its table, the coherent prime hash
otherwise, per-level entry offsets into one flat table, trilinear weights, and the torch backend's
border clamp on dense levels). One program handles a block of points on one level (grid: point
blocks x levels); the backward recomputes the corners and scatters into the table with atomic adds,
so nothing but the positions is kept between the two passes.

Tables may be float32 (default, what `HashEncoding` holds), float16 or bfloat16: a narrower table
halves the bytes gathered; values are read into float32, the output is float32, and the gradient
is accumulated in float32 (tiny table gradients underflow in float16) and returned in the table's
dtype. No gradient flows into the positions, as with the PyTorch backend.

The kernel is decorated on first use, not at import, so setting ``TRITON_INTERPRET=1`` at any
time before the first call runs it with Triton's CPU interpreter on CPU tensors (the tests do);
otherwise it compiles for CUDA and needs CUDA tensors. Speed on a GPU has not been measured yet.

No ``from __future__ import annotations`` here: the kernel's ``tl.constexpr`` annotations stay objects.
"""

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: Points per program. 128 points x F features keeps a level's gather in a few warps.
BLOCK_POINTS = 128
#: No FMA contraction: ``x * scale + 0.5`` rounds twice, as in the torch backend, so both pick the same
#: cell (and Triton 3.9 warns while its default is unset). A few more instructions, next to the random
#: table gathers that should dominate (unmeasured).
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


def _grid_kernel(x_ptr, table_ptr, out_ptr, grad_ptr, scales_ptr, res_ptr, sizes_ptr, offsets_ptr, primes_ptr,
                 n_points, num_dense, num_levels,
                 F: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """One block of points on one level. Forward: out[rows, level*F:(level+1)*F] = sum over the 8
    corners of w * table[row]. Backward (BACKWARD=True, out_ptr is the output gradient, grad_ptr a
    float32 table gradient): grad[row] += w * out[rows, level columns], atomically.

    One body for both passes (not two kernels sharing @triton.jit helpers) so the kernel can be
    decorated lazily, per interpreter mode, without helpers of the other mode in its globals.
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    level = tl.program_id(1)
    valid = rows < n_points
    feats = tl.arange(0, F)
    out_at = out_ptr + rows[:, None].to(tl.int64) * (num_levels * F) + level * F + feats[None, :]

    base = rows.to(tl.int64) * 3
    x = tl.load(x_ptr + base, mask=valid, other=0.0)
    y = tl.load(x_ptr + base + 1, mask=valid, other=0.0)
    z = tl.load(x_ptr + base + 2, mask=valid, other=0.0)
    bad = (x != x) | (y != y) | (z != z)
    # NaN -> 0 before the index maths, so a NaN position can never address memory outside the table.
    x = tl.minimum(tl.maximum(tl.where(x == x, x, 0.0), 0.0), 1.0)
    y = tl.minimum(tl.maximum(tl.where(y == y, y, 0.0), 0.0), 1.0)
    z = tl.minimum(tl.maximum(tl.where(z == z, z, 0.0), 0.0), 1.0)

    scale = tl.load(scales_ptr + level)
    px = x * scale + 0.5
    py = y * scale + 0.5
    pz = z * scale + 0.5
    gx = tl.floor(px)
    gy = tl.floor(py)
    gz = tl.floor(pz)
    fx = px - gx
    fy = py - gy
    fz = pz - gz
    vx = gx.to(tl.int64)
    vy = gy.to(tl.int64)
    vz = gz.to(tl.int64)

    res = tl.load(res_ptr + level).to(tl.int64)
    dense = level < num_dense
    # Dense levels: the last vertex layer (within half a cell of the upper faces) is clamped to the
    # border with weight 1 on the +1 vertex, as the torch backend does (hash_encoding's docstring).
    top = res - 2
    over_x = dense & (vx > top)
    over_y = dense & (vy > top)
    over_z = dense & (vz > top)
    vx = tl.where(over_x, top, vx)
    vy = tl.where(over_y, top, vy)
    vz = tl.where(over_z, top, vz)
    fx = tl.where(over_x, 1.0, fx)
    fy = tl.where(over_y, 1.0, fy)
    fz = tl.where(over_z, 1.0, fz)

    # tinycudann's coherent hash in uint32 arithmetic (products wrap mod 2^32, as in its CUDA code;
    # the torch backend gets the same bits in int64 and masks). The x prime is 1; tables are 2^k entries.
    mask = (tl.load(sizes_ptr + level) - 1).to(tl.uint32)
    p1 = tl.load(primes_ptr + 1).to(tl.uint32)
    p2 = tl.load(primes_ptr + 2).to(tl.uint32)
    offset = tl.load(offsets_ptr + level)

    if BACKWARD:
        g = tl.load(out_at, mask=valid[:, None], other=0.0).to(tl.float32)
        keep = valid & ~bad
    else:
        acc = tl.full((BLOCK, F), 0.0, tl.float32)  # not tl.zeros: a @jit helper (see _kernel)
    # Corner 4 bx + 2 by + bz, the torch backend's order. Nested static loops, not one over 8 corners
    # with ``b: tl.constexpr = ...`` inside: the compiler unrolls static_range by revisiting the body,
    # and a constexpr assigned in it would be redefined on the second pass (an error).
    for bx in tl.static_range(2):
        wx = fx if bx == 1 else 1.0 - fx
        cx = vx + bx
        for by in tl.static_range(2):
            wxy = wx * (fy if by == 1 else 1.0 - fy)
            cy = vy + by
            for bz in tl.static_range(2):
                w = wxy * (fz if bz == 1 else 1.0 - fz)
                cz = vz + bz
                dense_row = cx + cy * res + cz * res * res
                hashed = cx.to(tl.uint32) ^ (cy.to(tl.uint32) * p1) ^ (cz.to(tl.uint32) * p2)
                row = tl.where(dense, dense_row, (hashed & mask).to(tl.int64)) + offset
                at = row[:, None] * F + feats[None, :]
                if BACKWARD:
                    # relaxed: the sums need no ordering against other memory (no fences per add)
                    tl.atomic_add(grad_ptr + at, w[:, None] * g, mask=keep[:, None], sem="relaxed")
                else:
                    vals = tl.load(table_ptr + at, mask=valid[:, None], other=0.0)
                    acc += w[:, None] * vals.to(tl.float32)
    if not BACKWARD:
        acc = tl.where(bad[:, None], float("nan"), acc)  # a NaN position stays visible downstream
        tl.store(out_at, acc, mask=valid[:, None])


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at each call)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the variable through its knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The kernel, decorated on first use so the interpreter setting then in force is the one used:
    ``triton.jit`` picks interpreted or compiled from TRITON_INTERPRET when it decorates. One is kept
    per mode (a GPU machine may run the interpreter tests and the CUDA ones in one process).

    The kernel uses triton.language builtins only: the library's own @jit helpers (``tl.zeros``,
    ``tl.sum``, ...) are decorated when triton is imported, in the mode in force then, and a compiled
    helper cannot be called from an interpreted kernel.
    """
    del interpret  # the cache key; triton.jit reads the environment itself
    return triton.jit(_grid_kernel)


@dataclass(frozen=True)
class GridTensors:
    """The per-level layout as small tensors on the grid's device: scales (L,) float32, resolutions
    (L,) int64, table sizes (L,) int64, entry offsets (L,) int64, hash primes (3,) int64; plus the
    number of dense levels (they come first) and the total table entries. Build it with
    `from_layout` (checked) or `grid_tensors(encoding)` (a HashEncoding's buffers, no host sync)."""

    scales: torch.Tensor
    resolutions: torch.Tensor
    sizes: torch.Tensor
    offsets: torch.Tensor
    primes: torch.Tensor
    num_dense: int
    total_entries: int

    @classmethod
    def from_layout(cls, scales, resolutions, sizes, offsets, primes, num_dense: int,
                    device=None) -> "GridTensors":
        """From the Python lists of `hash_encoding.level_layout` (and its primes)."""
        if not len(scales) == len(resolutions) == len(sizes) == len(offsets) >= 1 or len(primes) != 3:
            raise ValueError(f"inconsistent hash-grid layout: {len(scales)} scales, {len(resolutions)} "
                             f"resolutions, {len(sizes)} sizes, {len(offsets)} offsets, {len(primes)} primes")
        if not 0 <= num_dense <= len(sizes):
            raise ValueError(f"num_dense must be in [0, {len(sizes)}], got {num_dense}")
        if any(size & (size - 1) for size in sizes[num_dense:]):
            raise ValueError(f"hashed levels need power-of-two tables, got sizes {list(sizes)}")

        def as_tensor(values, dtype):
            return torch.tensor(list(values), dtype=dtype, device=device)

        return cls(as_tensor(scales, torch.float32), as_tensor(resolutions, torch.int64),
                   as_tensor(sizes, torch.int64), as_tensor(offsets, torch.int64),
                   as_tensor(primes, torch.int64), int(num_dense), int(offsets[-1] + sizes[-1]))

    @property
    def num_levels(self) -> int:
        return int(self.scales.shape[0])

    def args(self):
        return self.scales, self.resolutions, self.sizes, self.offsets, self.primes


def _check(x: torch.Tensor, table: torch.Tensor, grid: GridTensors) -> None:
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"hash grid expects (N, 3) positions, got {tuple(x.shape)}")
    if table.ndim != 2 or table.shape[0] != grid.total_entries or table.shape[1] not in (1, 2, 4, 8):
        raise ValueError(
            f"hash grid table must be ({grid.total_entries}, F) with F in 1, 2, 4, 8, "
            f"got {tuple(table.shape)}"
        )
    if table.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"hash grid table must be float32, float16 or bfloat16, got {table.dtype}")
    devices = {x.device, table.device, grid.scales.device}
    if len(devices) != 1:
        raise ValueError(f"hash grid tensors must share one device, got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton hash grid runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), "
            f"got {x.device}"
        )


class HashGridFunction(torch.autograd.Function):
    """(x (N, 3) float32 in [0, 1], table (T, F), grid) -> (N, L*F) float32, level-major columns.

    Gradient into the table only (float32 accumulation, returned in the table's dtype). Under CUDA
    autocast the table keeps its dtype (no cast to float32): the kernel reads any of the three.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, table, grid: GridTensors):
        _check(x, table, grid)
        x = x.float().contiguous()
        table = table.contiguous()
        n, feat = x.shape[0], table.shape[1]
        out = torch.empty(n, grid.num_levels * feat, dtype=torch.float32, device=x.device)
        if n > 0:
            launch = (triton.cdiv(n, BLOCK_POINTS), grid.num_levels)
            _kernel(interpreting())[launch](x, table, out, out, *grid.args(), n, grid.num_dense,
                                            grid.num_levels, F=feat, BLOCK=BLOCK_POINTS, BACKWARD=False,
                                            **LAUNCH_OPTIONS)
        ctx.save_for_backward(x)
        ctx.grid = grid
        ctx.table_meta = (table.shape, table.dtype)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grid = ctx.grid
        shape, dtype = ctx.table_meta
        if not ctx.needs_input_grad[1]:
            return None, None, None
        grad_table = torch.zeros(shape, dtype=torch.float32, device=x.device)
        n = x.shape[0]
        if n > 0:
            launch = (triton.cdiv(n, BLOCK_POINTS), grid.num_levels)
            # The table itself is not read in the backward: grad_table stands in for its pointer.
            _kernel(interpreting())[launch](x, grad_table, grad_out.float().contiguous(), grad_table,
                                            *grid.args(), n, grid.num_dense, grid.num_levels,
                                            F=shape[1], BLOCK=BLOCK_POINTS, BACKWARD=True, **LAUNCH_OPTIONS)
        return None, grad_table.to(dtype), None


def hash_grid(x: torch.Tensor, table: torch.Tensor, grid: GridTensors) -> torch.Tensor:
    """Encode x (N, 3) in [0, 1] (clamped; NaN rows give NaN) with table (T, F) -> (N, L*F) float32."""
    return HashGridFunction.apply(x, table, grid)


@functools.lru_cache(maxsize=16)
def probe(features_per_level: int, device: str) -> str | None:
    """None when the kernels compile, run and match the PyTorch backend on ``device`` ("cuda:0"; "cpu"
    under the interpreter) for F features, else the reason. Run once per (F, device) when a model is
    built, so an unsupported GPU or a missing compiler shows at start-up, not in the middle of
    training. Draws nothing from the global random generators (model initialisation stays seeded)."""
    from .hash_encoding import HashEncoding, HashEncodingConfig  # late: hash_encoding imports us lazily

    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            # Two dense levels then two hashed ones: compiles and runs in well under a second.
            ref = HashEncoding(HashEncodingConfig(4, features_per_level, 12, 4, 64, "torch"))
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                ref.params.copy_(torch.randn(ref.params.shape, generator=gen))
            ref = ref.to(device)
            x = torch.rand(257, 3, generator=gen).to(device)
            table = ref.params.detach().view(ref.total_entries, features_per_level).clone()
            table.requires_grad_(True)
            out = hash_grid(x, table, grid_tensors(ref))
            out.sum().backward()
            expected = ref(x)
            expected.sum().backward()
            out_err = (out - expected).abs().max().item()  # .item() also waits for the kernels
            grad_err = (table.grad.view(-1) - ref.params.grad).abs().max().item()
    except Exception as exc:  # any compile / launch / driver failure: reported, never raised here
        return f"the Triton kernels failed on {device} ({type(exc).__name__}: {exc})"
    if not (out_err <= 1e-4 and grad_err <= 1e-4):
        return (f"the Triton kernels disagree with PyTorch on {device} (output {out_err:.2e}, "
                f"gradient {grad_err:.2e})")
    return None


def grid_tensors(encoding) -> GridTensors:
    """The `GridTensors` of a `HashEncoding` (its non-persistent layout buffers, on its device)."""
    return GridTensors(encoding._scales, encoding._res, encoding._sizes, encoding._offsets,
                       encoding._primes, encoding._num_dense, encoding.total_entries)
