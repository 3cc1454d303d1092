"""DINO ViT DenseEncoder via timm, loading weights from a local file only (never the network).

Weights: ``checkpoint_path`` (the original release ``dino_deitsmall16_pretrain.pth`` or timm's
``model.safetensors``; timm's checkpoint filter maps either onto its ViT), else ``cache_dir`` (or,
when None, ``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints`` and the Hugging
Face hub cache) searched for the release file name or timm's hub layout. ``random_init=True``
builds an untrained model (tests, benchmarks).

Output grid: the image is resized so both sides are multiples of ``stride`` (longer side at most
``max_side`` when given) and reflect-padded by (patch − stride) / 2, so with stride < patch
(overlapping patches, as LERF's DINO features use) cell (i, j) is still centred at
u = (j + 0.5) W / w − 0.5, v = (i + 0.5) H / h − 0.5 of the input image (``core/dense_features``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MissingWeightsError

RELEASE_FILES = {
    "vit_small_patch16_224.dino": "dino_deitsmall16_pretrain.pth",
    "vit_small_patch8_224.dino": "dino_deitsmall8_pretrain.pth",
    "vit_base_patch16_224.dino": "dino_vitbase16_pretrain.pth",
    "vit_base_patch8_224.dino": "dino_vitbase8_pretrain.pth",
}


def _default_cache_dirs() -> list[Path]:
    env = os.environ
    dirs = []
    if env.get("TORCH_HOME"):
        dirs.append(Path(env["TORCH_HOME"]) / "hub" / "checkpoints")
    dirs.append(Path.home() / ".cache" / "torch" / "hub" / "checkpoints")
    if env.get("HF_HUB_CACHE"):
        dirs.append(Path(env["HF_HUB_CACHE"]))
    if env.get("HF_HOME"):
        dirs.append(Path(env["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return [d.expanduser() for d in dirs]


def find_dino_checkpoint(model_name: str, checkpoint_path, cache_dir) -> Path:
    """Local weights file for model_name; MissingWeightsError naming every path searched."""
    if checkpoint_path is not None:
        p = Path(checkpoint_path).expanduser()
        if p.is_file():
            return p
        raise MissingWeightsError(
            f"DINO weights for {model_name} not found at checkpoint_path {str(p)!r}: give an existing "
            f"weights file (.pth / .safetensors)"
        )
    dirs = [Path(cache_dir).expanduser()] if cache_dir else _default_cache_dirs()
    wanted = []
    for d in dirs:
        names = [RELEASE_FILES.get(model_name, ""), f"{model_name}.pth", f"{model_name}.safetensors"]
        for name in filter(None, names):
            wanted.append(str(d / name))
            if (d / name).is_file():
                return d / name
        snaps = d / f"models--timm--{model_name}" / "snapshots"
        wanted.append(f"{snaps}/*/model.safetensors")
        for snap in sorted(snaps.glob("*")) if snaps.is_dir() else []:
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (snap / name).is_file():
                    return snap / name
    raise MissingWeightsError(
        f"DINO weights for {model_name} not found; looked for: {'; '.join(wanted)}. Copy the weights "
        f"file to one of these paths or pass checkpoint_path=<file> (no download is attempted)"
    )


_WIDTHS = {384: "small", 768: "base"}


def checkpoint_architecture(path) -> tuple[int, int]:
    """(patch size, embedding width) of a ViT weights file, read from its ``patch_embed.proj.weight``
    (D, 3, p, p) under any prefix ("module.", "backbone.", a "teacher" / "model" wrapper); ValueError
    naming the file when there is none."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or foreign file
            raise ValueError(f"DINO weights file {str(path)!r} cannot be read: {exc}") from exc
        for wrapper in ("teacher", "model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)} \
            if isinstance(state, dict) else {}
    for key, shape in shapes.items():
        if key.endswith("patch_embed.proj.weight") and len(shape) == 4 and shape[2] == shape[3]:
            return int(shape[2]), int(shape[0])
    raise ValueError(f"DINO weights file {str(path)!r} has no ViT patch_embed.proj.weight")


def model_for_checkpoint(model_name: str, path) -> str:
    """The timm DINO model whose patch size and width match the weights file (an S/8 file is built as
    ViT-S/8 even when ``model_name`` says S/16, instead of being resampled into the wrong model)."""
    patch, width = checkpoint_architecture(path)
    named = re.search(r"patch(\d+)", model_name)
    if named is None or int(named.group(1)) == patch:
        return model_name  # nothing to correct (a non-standard name is left to timm to check)
    size = _WIDTHS.get(width)
    if size is None:
        raise ValueError(f"DINO weights file {str(path)!r}: unsupported embedding width {width} "
                         f"(expected one of {sorted(_WIDTHS)})")
    return f"vit_{size}_patch{patch}_224.dino"


class DinoEncoder:
    """timm ViT patch features: (3, H, W) [0, 1] -> (dim, h, w), h = H' / stride (module docstring)."""

    def __init__(self, model, name: str, stride: int, max_side: int | None, device: torch.device):
        self.model, self.name, self.device = model, name, device
        self.patch = int(model.patch_embed.patch_size[0])
        self.stride = int(stride)
        self.max_side = max_side
        self.dim = int(model.embed_dim)
        self._prefix = int(getattr(model, "num_prefix_tokens", 1))
        self._dtype = next(model.parameters()).dtype
        self._layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
        cfg = model.pretrained_cfg
        self._mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=device).reshape(1, 3, 1, 1)
        self._std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=device).reshape(1, 3, 1, 1)

    @torch.no_grad()
    def encode_dense(self, image: Tensor) -> Tensor:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
        _, H, W = image.shape
        scale = min(1.0, self.max_side / max(H, W)) if self.max_side else 1.0
        st = self.stride
        h, w = max(1, round(H * scale / st)), max(1, round(W * scale / st))
        x = image.to(self.device, torch.float32).unsqueeze(0)
        if (h * st, w * st) != (H, W):
            x = F.interpolate(x, size=(h * st, w * st), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self._mean) / self._std
        pad = (self.patch - st) // 2
        if pad:
            x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if min(h, w) * st > pad else "replicate")
        tokens = self.model.forward_features(x.to(self._dtype, memory_format=self._layout))[0, self._prefix :]
        if tokens.shape[0] != h * w:
            raise ValueError(f"encoder {self.name!r} produced {tokens.shape[0]} patches, expected {h}x{w}")
        return tokens.float().T.reshape(self.dim, h, w)


def dino_encoder(
    device: str | torch.device = "cpu",
    model_name: str = "vit_small_patch16_224.dino",
    checkpoint_path: str | None = None,
    cache_dir: str | None = None,
    stride: int | None = None,
    max_side: int | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> DinoEncoder:
    """Build a DINO dense encoder from local weights (module docstring). stride None = patch size."""
    import timm

    if model_name not in timm.list_models():
        base = model_name.split(".")[0]
        if base not in timm.list_models():
            raise ValueError(f"unknown timm model {model_name!r}")
    dev = torch.device(device)
    kwargs = dict(num_classes=0, dynamic_img_size=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if random_init:
            model = timm.create_model(model_name, pretrained=False, **kwargs)
            tag = f"random-seed{seed}"
        else:
            ckpt = find_dino_checkpoint(model_name, checkpoint_path, cache_dir)
            model_name = model_for_checkpoint(model_name, ckpt)
            try:
                model = timm.create_model(
                    model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt)), **kwargs
                )
            except (RuntimeError, KeyError, ValueError, OSError) as exc:
                raise ValueError(f"DINO weights file {str(ckpt)!r} does not fit {model_name}: {exc}") from exc
            tag = ckpt.name
    patch = int(model.patch_embed.patch_size[0])
    st = patch if stride is None else int(stride)
    if not (1 <= st <= patch) or (patch - st) % 2:
        raise ValueError(f"stride must be in 1..{patch} with patch - stride even, got {stride}")
    if max_side is not None and max_side < st:
        raise ValueError(f"max_side must be >= stride {st}, got {max_side}")
    # Overlapping patches: the patch embedding convolution steps by `stride`; timm's dynamic image
    # size then interpolates the position embedding to the denser grid.
    model.patch_embed.proj.stride = (st, st)
    # The padded input is a whole number of strides, not of patches: skip timm's size assertion
    # (the token count is checked against the expected grid in encode_dense instead).
    model.patch_embed.img_size = None
    if dev.type == "cuda":  # fp16, channels-last: the patch embedding's fastest path on a GPU
        model = model.half().to(memory_format=torch.channels_last)
    model = model.to(dev).eval()
    name = f"timm-dino:{model_name}:{tag}:stride{st}:max{max_side or 0}"
    return DinoEncoder(model, name, st, max_side, dev)
