"""Ingest-time normalisation of a `Frame`: validate, undistort once, downsize (the engine's ``add_frame``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .camera import undistort_depth, undistort_image
from .frame import Frame


def prepare_frame(frame: Frame, max_image_side: int) -> Frame:
    """Validate (ValueError naming the value), undistort, downsize so the longer side <= max_image_side
    pixels (0 = keep). Returns a pinhole Frame; its depth (if any) is float32 z metres, NaN where invalid."""
    return prepare_frame_with_source(frame, max_image_side)[0]


def prepare_frame_with_source(frame: Frame, max_image_side: int) -> tuple[Frame, np.ndarray | None]:
    """`prepare_frame`, plus the undistorted image at full resolution (H, W, 3) uint8 when it was
    downsized (else None): the CLIP pyramid crops from it (`ClipPyramid.compute`'s ``source``)."""
    frame.validate()
    image, intr = undistort_image(frame.image, frame.intrinsics)
    depth = None
    if frame.depth_m is not None:
        depth, _ = undistort_depth(np.asarray(frame.depth_m, dtype=np.float32), frame.intrinsics)
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan).astype(np.float32)
    side = max_image_side
    source = None
    if side and max(intr.width, intr.height) > side:
        source = image
        intr = intr.scaled(side / max(intr.width, intr.height))
        img_t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        img_t = F.interpolate(img_t, size=(intr.height, intr.width), mode="area")
        image = img_t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        if depth is not None:  # nearest: averaging across an occlusion edge would invent surfaces
            d_t = F.interpolate(torch.from_numpy(depth)[None, None], size=(intr.height, intr.width),
                                mode="nearest")
            depth = d_t[0, 0].numpy()
    return Frame(np.ascontiguousarray(image), intr, np.asarray(frame.T_world_cam, np.float64),
                 int(frame.stamp_ns), depth, frame.camera), source
