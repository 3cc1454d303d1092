"""Per-keyframe dense (DINO) feature maps, stored on the device, sampled bilinearly at ray pixels.

Also home of the keyframe feature store shared with the CLIP pyramid: per image size, one tensor
(capacity, cells, D) with a slot per keyframe, so a batch of rays spread over many keyframes is
sampled with a handful of gathers instead of a loop over keyframes.

Pixel convention (``core/frames/camera.py``): pixel (row i, column j) is at (u, v) = (j, i), centres at
integers. A feature cell (i, j) of an (h, w) map over an H x W image is centred at
u = (j + 0.5) W / w − 0.5, v = (i + 0.5) H / h − 0.5.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..encoders.base import DenseEncoder, checked_encode_dense

STATE_FORMAT = "lerf_ros.dense_features/1"


class Cancelled(RuntimeError):
    """Keyframe feature computation abandoned because a stop was requested; nothing was stored."""


def check_cancel(cancel: threading.Event | None, what: str) -> None:
    """Raise `Cancelled` if ``cancel`` is set (checked between encoder batches)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled (stop requested)")


def image_to_tensor(image, device: torch.device) -> Tensor:
    """(H, W, 3) uint8 numpy / tensor or (3, H, W) uint8 / float [0, 1] tensor -> (3, H, W) float32 [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float() / 255.0
    if not isinstance(image, Tensor):
        raise ValueError(f"image must be a numpy array or tensor, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[-1] == 3 and image.shape[0] != 3 and image.dtype == torch.uint8:
        image = image.permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise ValueError(f"image tensor must be (3, H, W), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.to(device).float() / 255.0
    if not image.is_floating_point() or not torch.isfinite(image).all():
        raise ValueError(f"image tensor must be uint8 or finite float in [0, 1], got {image.dtype}")
    return image.to(device).float().clamp(0.0, 1.0)


def canonical_image_bytes(image) -> tuple[tuple[int, int], bytes]:
    """((H, W), bytes of the (H, W, 3) uint8 image): the same content gives the same bytes in any format."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        arr = np.ascontiguousarray(image)
    else:
        t = image_to_tensor(image, torch.device("cpu"))
        arr = (t * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return (int(arr.shape[0]), int(arr.shape[1])), arr.tobytes()


def bilinear_corners(gx: Tensor, gy: Tensor, nx: Tensor, ny: Tensor) -> tuple[Tensor, Tensor]:
    """Cells and weights for bilinear interpolation on (ny, nx) grids, clamped at the border.

    gx, gy: (R,) continuous grid coordinates (cell centres at integers); nx, ny: (R,) long grid sizes.
    Returns flat cell indices (R, 4) = iy * nx + ix and weights (R, 4) summing to 1.
    """
    gx = torch.minimum(gx.clamp(min=0.0), (nx - 1).to(gx.dtype))
    gy = torch.minimum(gy.clamp(min=0.0), (ny - 1).to(gy.dtype))
    x0 = torch.minimum(gx.floor().long(), (nx - 2).clamp(min=0))
    y0 = torch.minimum(gy.floor().long(), (ny - 2).clamp(min=0))
    fx, fy = gx - x0, gy - y0
    x1, y1 = torch.minimum(x0 + 1, nx - 1), torch.minimum(y0 + 1, ny - 1)
    idx = torch.stack([y0 * nx + x0, y0 * nx + x1, y1 * nx + x0, y1 * nx + x1], dim=1)
    w = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
    return idx, w


def per_layout(lay_idx: Tensor, slots: Tensor, n_layouts: int, fn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Rows of several layouts without a host sync: ``fn(layout index, slots (R,))`` -> (R, ...) computes
    every row as if it were of that layout (rows of other layouts read slot 0, which every bank has), and
    each row keeps its own layout's result. One layout (one camera): a single call, nothing masked."""
    if n_layouts == 1:
        return fn(0, slots)
    out = None
    for li in range(n_layouts):
        mine = lay_idx == li
        val = fn(li, torch.where(mine, slots, 0))
        mine = mine.reshape(-1, *([1] * (val.ndim - 1)))
        out = torch.where(mine, val, 0.0 if out is None else out)
    return out


@dataclass
class _Bank:
    storage: Tensor  # (capacity, cells, D)
    free: list[int]


class KeyframeFeatureStore:
    """Feature grids (cells, D) per keyframe, grouped by layout (e.g. image size) into slot tensors.

    Thread-safe: the engine adds from a worker while the trainer samples; ``lock`` is an RLock that
    callers may hold across ``lookup`` + ``gather``.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device):
        self.dim, self.dtype, self.device = int(dim), dtype, torch.device(device)
        self.lock = threading.RLock()
        self._banks: dict[tuple, _Bank] = {}
        self._where: dict[int, tuple[tuple, int]] = {}  # kf_id -> (layout, slot)
        self._index: tuple[Tensor, Tensor, list[tuple]] | None = None

    def put(self, kf_id: int, layout: tuple, grid: Tensor) -> None:
        """Store (cells, D) features for kf_id under layout, replacing any earlier entry."""
        if grid.ndim != 2 or grid.shape[1] != self.dim:
            raise ValueError(f"grid must be (cells, {self.dim}), got {tuple(grid.shape)}")
        with self.lock:
            self.remove(kf_id)
            bank = self._banks.get(layout)
            if bank is None:
                storage = torch.zeros(4, grid.shape[0], self.dim, dtype=self.dtype, device=self.device)
                bank = self._banks[layout] = _Bank(storage, list(range(3, -1, -1)))
            if grid.shape[0] != bank.storage.shape[1]:
                raise ValueError(
                    f"grid has {grid.shape[0]} cells, layout {layout} has {bank.storage.shape[1]}"
                )
            if not bank.free:  # grow by doubling so adds stay amortised O(1)
                cap = bank.storage.shape[0]
                bank.storage = torch.cat([bank.storage, torch.zeros_like(bank.storage)])
                bank.free = list(range(2 * cap - 1, cap - 1, -1))
            slot = bank.free.pop()
            bank.storage[slot] = grid.to(self.device, self.dtype)
            self._where[int(kf_id)] = (layout, slot)
            self._index = None

    def remove(self, kf_id: int) -> bool:
        with self.lock:
            entry = self._where.pop(int(kf_id), None)
            if entry is None:
                return False
            layout, slot = entry
            self._banks[layout].free.append(slot)
            if len(self._banks[layout].free) == self._banks[layout].storage.shape[0]:
                del self._banks[layout]  # last keyframe of this size: give the memory back
            self._index = None
            return True

    def contains(self, kf_id: int) -> bool:
        return int(kf_id) in self._where

    def ids(self) -> list[int]:
        with self.lock:
            return sorted(self._where)

    def layout(self, kf_id: int) -> tuple:
        return self._where[int(kf_id)][0]

    def grid(self, kf_id: int) -> Tensor:
        """(cells, D) stored features of one keyframe (a copy)."""
        with self.lock:
            layout, slot = self._where[int(kf_id)]
            return self._banks[layout].storage[slot].clone()

    def lookup(self, kf_ids: Tensor, check: bool = True) -> tuple[Tensor, Tensor, list[tuple]]:
        """(R,) keyframe ids -> layout index (R,), slot (R,), layouts; ValueError for unknown ids.

        check=False skips that check, which waits for the device (a training batch's ids are drawn from
        keyframes known to have features); an unknown id then reads another keyframe's features."""
        with self.lock:
            if self._index is None:
                layouts = list(self._banks)
                items = sorted(self._where.items())
                ids = torch.tensor([k for k, _ in items], dtype=torch.long, device=self.device)
                meta = torch.tensor(
                    [[layouts.index(lay), slot] for _, (lay, slot) in items],
                    dtype=torch.long,
                    device=self.device,
                ).reshape(-1, 2)
                self._index = (ids, meta, layouts)
            ids, meta, layouts = self._index
        k = kf_ids.to(self.device, torch.long).reshape(-1)
        if ids.numel() == 0:
            if k.numel():
                raise ValueError(f"no keyframe features stored; asked for ids {k[:5].tolist()}")
            return k, k, layouts
        pos = torch.searchsorted(ids, k).clamp(max=ids.numel() - 1)
        bad = ids[pos] != k
        if check and bool(bad.any()):
            raise ValueError(f"keyframe ids without features: {sorted(set(k[bad].tolist()))[:10]}")
        return meta[pos, 0], meta[pos, 1], layouts

    def gather(self, layout: tuple, slots: Tensor, cells: Tensor) -> Tensor:
        """slots (R,), cells (R, C) -> (R, C, D) float32."""
        with self.lock:
            storage = self._banks[layout].storage
            return storage[slots.unsqueeze(1), cells].float()


class DenseFeatureCache:
    """Dense encoder feature maps per keyframe (stored fp16) and their bilinear interpolation."""

    def __init__(self, encoder: DenseEncoder, device: str | torch.device = "cpu", dtype: str = "float16"):
        if dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"dtype must be float16, float32 or bfloat16, got {dtype!r}")
        self.encoder = encoder
        self.device = torch.device(device)
        self.dim = int(encoder.dim)
        self.store = KeyframeFeatureStore(self.dim, getattr(torch, dtype), self.device)

    def add(self, kf_id: int, image, cancel: threading.Event | None = None) -> None:
        """Encode one keyframe image ((H, W, 3) uint8 or (3, H, W) tensor) and store its (h, w) map.

        cancel: when set before or during the (single) encoder call, raise `Cancelled`, store nothing.
        """
        img = image_to_tensor(image, self.device)
        check_cancel(cancel, f"dense features of keyframe {kf_id}")
        with torch.no_grad():
            feats = checked_encode_dense(self.encoder, img)  # (D, h, w)
        check_cancel(cancel, f"dense features of keyframe {kf_id}")
        _, h, w = feats.shape
        layout = (int(img.shape[1]), int(img.shape[2]), int(h), int(w))
        self.store.put(kf_id, layout, feats.permute(1, 2, 0).reshape(h * w, self.dim))

    def ready(self, kf_id: int) -> bool:
        return self.store.contains(kf_id)

    def remove(self, kf_id: int) -> bool:
        return self.store.remove(kf_id)

    def sample(self, kf_ids: Tensor, uv: Tensor, check_ids: bool = True) -> Tensor:
        """kf_ids (R,) long, uv (R, 2) pixels (column, row) -> (R, D) float32 bilinear features.

        No host sync with ``check_ids=False`` (`KeyframeFeatureStore.lookup`): with several layouts every
        row is interpolated in each and the right one kept (``per_layout``)."""
        if uv.ndim != 2 or uv.shape[1] != 2 or uv.shape[0] != kf_ids.reshape(-1).shape[0]:
            raise ValueError(f"uv must be (R, 2) matching kf_ids (R,), got {tuple(uv.shape)}")
        uv = uv.to(self.device, torch.float32)
        r = uv.shape[0]

        def interpolate(li: int, slots: Tensor) -> Tensor:
            H, W, h, w = layouts[li]
            gx = (uv[:, 0] + 0.5) * (w / W) - 0.5
            gy = (uv[:, 1] + 0.5) * (h / H) - 0.5
            nx = torch.full((r,), w, dtype=torch.long, device=self.device)
            ny = torch.full((r,), h, dtype=torch.long, device=self.device)
            idx, wts = bilinear_corners(gx, gy, nx, ny)
            return (self.store.gather(layouts[li], slots, idx) * wts.unsqueeze(2)).sum(dim=1)

        with self.store.lock:
            lay_idx, slots, layouts = self.store.lookup(kf_ids, check_ids)
            if not layouts:
                return torch.zeros(r, self.dim, device=self.device)
            return per_layout(lay_idx, slots, len(layouts), interpolate)

    def state_dict(self) -> dict:
        """CPU tensors + plain values for the map directory."""
        with self.store.lock:
            kfs = {
                k: {"layout": list(self.store.layout(k)), "grid": self.store.grid(k).cpu()}
                for k in self.store.ids()
            }
        return {"format": STATE_FORMAT, "encoder_name": self.encoder.name, "dim": self.dim, "keyframes": kfs}

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a saved state; ValueError (nothing changed) on any mismatch."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a dense feature state (format {got!r}, expected {STATE_FORMAT!r})")
        if state.get("encoder_name") != self.encoder.name or state.get("dim") != self.dim:
            raise ValueError(
                f"dense features were made by encoder {state.get('encoder_name')!r} "
                f"(dim {state.get('dim')}), "
                f"this cache uses {self.encoder.name!r} (dim {self.dim})"
            )
        fresh = KeyframeFeatureStore(self.dim, self.store.dtype, self.device)
        for kf_id, entry in dict(state.get("keyframes", {})).items():
            try:
                H, W, h, w = (int(x) for x in entry["layout"])
                grid = entry["grid"]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"dense feature entry for keyframe {kf_id!r} is malformed: {exc}") from exc
            if not isinstance(grid, Tensor) or tuple(grid.shape) != (h * w, self.dim):
                shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
                raise ValueError(
                    f"dense features of keyframe {kf_id}: shape {shape}, expected ({h * w}, {self.dim})"
                )
            if not torch.isfinite(grid.float()).all():
                raise ValueError(f"dense features of keyframe {kf_id} are not finite")
            fresh.put(int(kf_id), (H, W, h, w), grid)
        self.store = fresh
