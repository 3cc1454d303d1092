"""OpenCLIP VisionLanguageEncoder, loading weights from local files only (never the network).

Where the weights come from, in order:
1. ``checkpoint_path``: a weights file (.safetensors / .bin / .pt / .pth) or a folder holding one;
2. ``cache_dir`` (or, when None, ``$OPENCLIP_CACHE_DIR``, ``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
   ``~/.cache/huggingface/hub`` and ``~/.cache/clip``), searched for
   - a file named after the tag: ``<pretrained>.<ext>`` or ``<model_name>-<pretrained>.<ext>``,
   - open_clip's own cache layouts: ``models--<org>--<repo>/snapshots/*/open_clip_*`` (Hugging Face
     hub cache, as written by ``open_clip.create_model(..., pretrained=tag)`` on a connected
     machine) or the basename of the tag's download URL.
``pretrained=None`` builds a randomly initialised model (seeded, for tests and benchmarks).
When nothing is found the error names every place searched and how to provide the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MissingWeightsError

WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth")
OPEN_CLIP_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def _default_cache_dirs() -> list[Path]:
    env = os.environ
    dirs = [env.get("OPENCLIP_CACHE_DIR"), env.get("HF_HUB_CACHE")]
    if env.get("HF_HOME"):
        dirs.append(str(Path(env["HF_HOME"]) / "hub"))
    dirs += [str(Path.home() / ".cache" / "huggingface" / "hub"), str(Path.home() / ".cache" / "clip")]
    return [Path(d).expanduser() for d in dirs if d]


def _weights_in_dir(folder: Path) -> Path | None:
    for name in OPEN_CLIP_FILES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_EXTS)
    return files[0] if len(files) == 1 else None


def find_checkpoint(
    model_name: str, pretrained: str, checkpoint_path: str | os.PathLike | None, cache_dir: str | None
) -> Path:
    """Local weights file for (model_name, pretrained); MissingWeightsError naming what was searched."""
    if checkpoint_path is not None:
        p = Path(checkpoint_path).expanduser()
        if p.is_file():
            return p
        found = _weights_in_dir(p) if p.is_dir() else None
        if found is not None:
            return found
        raise MissingWeightsError(
            f"OpenCLIP weights for {model_name} ({pretrained}) not found at checkpoint_path {str(p)!r}: "
            f"give an existing weights file ({', '.join(WEIGHT_EXTS)}) or a folder holding one of "
            f"{', '.join(OPEN_CLIP_FILES)}"
        )
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    dirs = [Path(cache_dir).expanduser()] if cache_dir else _default_cache_dirs()
    wanted: list[str] = []
    for d in dirs:
        for stem in (pretrained, f"{model_name}-{pretrained}"):
            for ext in WEIGHT_EXTS:
                cand = d / f"{stem}{ext}"
                wanted.append(str(cand))
                if cand.is_file():
                    return cand
        hub = cfg.get("hf_hub", "").strip("/")
        if hub:
            repo = d / ("models--" + hub.replace("/", "--"))
            wanted.append(f"{repo}/snapshots/*/{{{','.join(OPEN_CLIP_FILES)}}}")
            for snap in sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []:
                found = _weights_in_dir(snap)
                if found is not None:
                    return found
        if cfg.get("url"):
            cand = d / os.path.basename(cfg["url"])
            wanted.append(str(cand))
            if cand.is_file():
                return cand
    raise MissingWeightsError(
        f"OpenCLIP weights for {model_name} ({pretrained}) not found; looked for: {'; '.join(wanted)}. "
        f"Copy the weights file to one of these paths, or pass checkpoint_path=<file> (no download is "
        f"attempted; on a connected machine `open_clip.create_model({model_name!r}, pretrained="
        f"{pretrained!r}, cache_dir=DIR)` fills DIR, which can then be copied here)"
    )


class OpenClipEncoder:
    """OpenCLIP image/text encoder: (B, 3, S, S) [0, 1] -> (B, dim) unit; texts -> (T, dim) unit.

    Normalises with the model's mean / std (open_clip preprocessing); crops arrive already resized
    to ``input_size``, other sizes are resized bicubically. fp16 weights and inputs on CUDA, channels-last
    (the patch embedding's convolution reads NHWC fastest there); fp32 on the CPU.
    """

    def __init__(self, model, tokenizer, name: str, mean, std, device: torch.device):
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        size = model.visual.image_size
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        with torch.no_grad():
            self.dim = int(model.encode_text(tokenizer(["probe"]).to(device)).shape[-1])
        self._dtype = next(model.parameters()).dtype
        self._layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", align_corners=False).clamp(0, 1)
        x = ((x - self._mean) / self._std).to(self._dtype, memory_format=self._layout)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        if len(texts) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def openclip_encoder(
    device: str | torch.device = "cpu",
    model_name: str = "ViT-B-16",
    pretrained: str | None = "laion2b_s34b_b88k",
    checkpoint_path: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> OpenClipEncoder:
    """Build an OpenCLIP encoder from local weights (module docstring); pretrained=None -> random init."""
    import open_clip

    if ":" in model_name:
        raise ValueError(
            f"model_name must be a plain open_clip config name (no hub schema), got {model_name!r}"
        )
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model config {model_name!r} (register it with open_clip.add_model_config)"
        )
    dev = torch.device(device)
    ckpt = None if pretrained is None else find_checkpoint(model_name, pretrained, checkpoint_path, cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random init is reproducible, so its name can be part of cache keys
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    if ckpt is not None:
        try:
            open_clip.load_checkpoint(model, str(ckpt))
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise ValueError(f"OpenCLIP weights file {str(ckpt)!r} does not fit {model_name}: {exc}") from exc
    if dev.type == "cuda":
        model = model.half().to(memory_format=torch.channels_last)
    model = model.to(dev).eval()
    mean = getattr(model.visual, "preprocess_cfg", {}).get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = getattr(model.visual, "preprocess_cfg", {}).get("std", open_clip.OPENAI_DATASET_STD)
    if pretrained is not None:
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        mean, std = cfg.get("mean", mean), cfg.get("std", std)
    tag = pretrained if pretrained is not None else f"random-seed{seed}"
    tokenizer = open_clip.get_tokenizer(model_name)
    return OpenClipEncoder(model, tokenizer, f"openclip:{model_name}:{tag}", mean, std, dev)
