"""Encoder loading and validation, the DEMO colour encoders, and the real OpenCLIP / timm code paths."""

import re
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lerf_ros.core.encoders import (
    DEMO_CLIP,
    DEMO_DENSE,
    EncoderSpec,
    checked_encode_images,
    checked_encode_texts,
    load_encoder,
)
from lerf_ros.core.language.relevancy import CANONICAL_NEGATIVES, relevancy

# The synthetic scene's object colours (RGB 0-255) and an off-white wall.
SCENE_COLOURS = {
    "red": (200, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 200),
    "yellow": (220, 200, 30),
    "cyan": (30, 190, 200),
    "magenta": (190, 40, 170),
}
ABSENT = ("orange", "purple", "pink", "black")
WALL = (225, 220, 210)  # off-white wall
FLOOR = (110, 110, 110)  # mid-grey floor


def _patch(rgb, brightness, wall_fraction, seed, size=32, wall=WALL):
    """A Lambert-shaded colour patch with low-contrast grey texture; the top rows replaced by wall."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.tensor(rgb, dtype=torch.float32).reshape(3, 1, 1) / 255.0
    img = colour * brightness * torch.ones(3, size, size)
    img = img + 0.04 * torch.randn(1, size, size, generator=g)
    rows = round(wall_fraction * size)
    img[:, :rows] = torch.tensor(wall, dtype=torch.float32).reshape(3, 1, 1) / 255.0 * brightness
    return img.clamp(0, 1)


@pytest.fixture(scope="module")
def demo():
    return load_encoder(DEMO_CLIP, "cpu")


@pytest.mark.parametrize("brightness", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("wall_fraction", [0.0, 0.3])
@pytest.mark.parametrize("wall", [WALL, FLOOR])
def test_demo_colour_relevancy_separates_scene_colours(demo, brightness, wall_fraction, wall):
    names = list(SCENE_COLOURS)
    queries = checked_encode_texts(demo, [f"the {n} object" for n in names] + list(ABSENT))
    negatives = checked_encode_texts(demo, list(CANONICAL_NEGATIVES))
    patches = torch.stack(
        [
            _patch(rgb, brightness, wall_fraction, seed=i, size=demo.input_size, wall=wall)
            for i, rgb in enumerate(SCENE_COLOURS.values())
        ]
    )
    embeds = checked_encode_images(demo, patches)
    table = torch.stack([relevancy(embeds, queries[j], negatives) for j in range(len(queries))])  # (Q, P)
    for i, name in enumerate(names):
        own = float(table[i, i])
        others = torch.cat([table[:i, i], table[i + 1 :, i]])
        assert own > 0.6, f"{name} patch scores {own:.3f} for its own name"
        assert float(others.max()) < 0.5, f"{name} patch scores {others.max():.3f} for another colour"


def test_demo_relevancy_crosses_half_at_a_third_of_the_crop(demo):
    q = demo.encode_texts(["red"])[0]
    neg = demo.encode_texts(list(CANONICAL_NEGATIVES))
    # share s of pure red, rest wall: relevancy > 0.5 iff s > g (sqrt(1 + tg^2) - tg) = 0.328
    scores = {}
    for share in (0.25, 0.3, 0.375, 0.45):
        img = _patch(SCENE_COLOURS["red"], 1.0, 1.0 - share, seed=0, size=64)
        img = img.flip(1)  # wall rows at the bottom, red rows on top; noise does not matter here
        scores[share] = float(relevancy(demo.encode_images(img[None]), q, neg))
    assert scores[0.25] < 0.45 and scores[0.3] < 0.5 < scores[0.375] and scores[0.45] > 0.6
    assert scores[0.25] < scores[0.3] < scores[0.375] < scores[0.45]


def test_demo_generic_texts_embed_to_neutral_and_score_half(demo):
    neg = demo.encode_texts([*CANONICAL_NEGATIVES, "a chair", ""])
    assert torch.allclose(neg, neg[0:1].expand_as(neg))
    patch = _patch(SCENE_COLOURS["red"], 1.0, 0.0, seed=0)[None]
    r = relevancy(demo.encode_images(patch), demo.encode_texts(["things"])[0], neg[:4])
    assert float(r) == pytest.approx(0.5, abs=1e-6)


def test_demo_text_colour_words_and_synonyms(demo):
    t = demo.encode_texts(["something red", "the RED box", "gray", "grey", "red and blue"])
    assert torch.allclose(t[0], t[1])
    assert torch.allclose(t[2], t[3])
    red = demo.colour_words("the RED box")
    assert red == ["red"]
    # two colours share the colour mass equally, plus the same small generic part
    both = t[4]
    assert both[0] == pytest.approx(float(both[5]), abs=1e-6) and float(both[0]) > 0.6


def test_demo_encoder_is_deterministic_and_unit(demo):
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a, b = demo.encode_images(x), demo.encode_images(x.clone())
    assert torch.equal(a, b)
    assert a.shape == (5, demo.dim) and torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-6)
    assert "demo" in demo.name


def test_demo_dense_encoder_grid_and_features():
    enc = load_encoder(DEMO_DENSE, "cpu", dense=True)
    img = torch.zeros(3, 40, 64)
    img[0, :, :32] = 1.0  # left half red, right half black
    f = enc.encode_dense(img)
    assert f.shape == (enc.dim, 5, 8)
    assert torch.allclose(f[0, :, :3], torch.ones(5, 3)) and torch.allclose(f[0, :, 5:], torch.zeros(5, 3))
    # the forward difference across the red/black edge (pixels 31 -> 32) lands in cell column 3 only
    assert float(f[6, :, 3].min()) > 0
    assert float(f[6, :, :3].abs().max()) == 0.0 and float(f[6, :, 4:].abs().max()) == 0.0
    assert float(f[7].abs().max()) == 0.0
    assert torch.equal(f, enc.encode_dense(img.clone()))


# ---- loading and validation ----------------------------------------------------------------------


BAD_MODULE = textwrap.dedent(
    """
    import torch

    class Enc:
        def __init__(self, device, dim, out_dim, scale, nan):
            self.name, self.dim, self.input_size = "bad-enc", dim, 8
            self.out_dim, self.scale, self.nan = out_dim, scale, nan

        def _out(self, n):
            x = torch.zeros(n, self.out_dim)
            x[:, 0] = self.scale
            if self.nan:
                x[:, 0] = float("nan")
            return x

        def encode_images(self, images):
            return self._out(images.shape[0])

        def encode_texts(self, texts):
            return self._out(len(texts))

    def make(device, dim=4, out_dim=4, scale=1.0, nan=False):
        return Enc(device, dim, out_dim, scale, nan)

    def not_an_encoder(device):
        return object()
    """
)


@pytest.fixture
def bad_module(tmp_path, monkeypatch):
    (tmp_path / "lerf_test_bad_encoders.py").write_text(BAD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "lerf_test_bad_encoders"


def test_encoder_spec_parsing_and_kwargs():
    spec = EncoderSpec.from_string(" lerf_ros.core.encoders.demo:colour_name_encoder ", {"dim": 20})
    assert spec.target == "lerf_ros.core.encoders.demo:colour_name_encoder"
    assert spec.kwargs == (("dim", 20),)
    enc = load_encoder(spec)
    assert enc.dim == 20 and enc.encode_texts(["red"]).shape == (1, 20)
    for bad in ["lerf_ros.core.encoders.demo", "no colon", ":factory", "mod:", "a-b:c"]:
        with pytest.raises(ValueError):
            EncoderSpec.from_string(bad)
    with pytest.raises(ValueError, match="device"):
        EncoderSpec("a.b:c", (("device", "cpu"),))


def test_load_encoder_accepts_good_and_names_bad(bad_module):
    assert load_encoder(f"{bad_module}:make").dim == 4
    with pytest.raises(ValueError, match=r"bad-enc.*shape \(2, 5\)"):
        load_encoder(EncoderSpec(f"{bad_module}:make", (("out_dim", 5),)))
    with pytest.raises(ValueError, match=r"bad-enc.*non-unit"):
        load_encoder(EncoderSpec(f"{bad_module}:make", (("scale", 2.0),)))
    with pytest.raises(ValueError, match=r"bad-enc.*non-finite"):
        load_encoder(EncoderSpec(f"{bad_module}:make", (("nan", True),)))
    with pytest.raises(ValueError, match="name"):
        load_encoder(f"{bad_module}:not_an_encoder")
    with pytest.raises(ValueError, match="missing_factory"):
        load_encoder(f"{bad_module}:missing_factory")
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        load_encoder("no_such_module_xyz:factory")


def test_checked_encode_raises_at_run_time(bad_module):
    enc = load_encoder(f"{bad_module}:make")
    enc.scale = 0.5  # starts misbehaving after loading
    with pytest.raises(ValueError, match="bad-enc"):
        checked_encode_images(enc, torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match="bad-enc"):
        checked_encode_texts(enc, ["a"])
    with pytest.raises(ValueError, match="sequence"):
        checked_encode_texts(enc, "a")


# ---- OpenCLIP (real code path with a tiny randomly initialised model) ----------------------------

OPENCLIP = "lerf_ros.core.encoders.openclip:openclip_encoder"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    import json

    open_clip = pytest.importorskip("open_clip")  # a hard dependency; importorskip only names it if absent
    path = tmp_path_factory.mktemp("clipcfg") / "lerf-test-tiny-vit.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return "lerf-test-tiny-vit"


def _clip(name, **kw):
    return load_encoder(EncoderSpec(OPENCLIP, tuple({"model_name": name, **kw}.items())))


def test_openclip_tiny_random_shapes_unit_norm_determinism(tiny_clip_name):
    enc = _clip(tiny_clip_name, pretrained=None)
    assert (enc.dim, enc.input_size) == (32, 32)
    assert tiny_clip_name in enc.name and "random" in enc.name
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = checked_encode_images(enc, x)
    assert a.shape == (3, 32) and torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(a, _clip(tiny_clip_name, pretrained=None).encode_images(x), atol=1e-6)
    t = checked_encode_texts(enc, ["a red box", "stuff"])
    assert t.shape == (2, 32) and not torch.allclose(t[0], t[1])
    # open_clip preprocessing: (x - mean) / std with the CLIP statistics, then the image tower
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)
    ref = F.normalize(enc.model.encode_image((x - mean) / std), dim=1)
    assert torch.allclose(a, ref, atol=1e-5)
    # other sizes are resized to input_size
    assert checked_encode_images(enc, torch.rand(1, 3, 48, 48)).shape == (1, 32)


def test_openclip_loads_local_checkpoint_by_tag(tiny_clip_name, tmp_path):
    other = _clip(tiny_clip_name, pretrained=None, seed=1)
    torch.save(other.model.state_dict(), tmp_path / "mytag.pt")
    enc = _clip(tiny_clip_name, pretrained="mytag", cache_dir=str(tmp_path))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(enc.encode_images(x), other.encode_images(x), atol=1e-6)
    assert not torch.allclose(enc.encode_images(x), _clip(tiny_clip_name, pretrained=None).encode_images(x))
    assert enc.name.endswith(":mytag")
    same = _clip(tiny_clip_name, pretrained="mytag", checkpoint_path=str(tmp_path / "mytag.pt"))
    assert torch.allclose(same.encode_texts(["red"]), other.encode_texts(["red"]), atol=1e-6)


def test_openclip_missing_weights_name_the_paths(tiny_clip_name, tmp_path):
    from lerf_ros.core.encoders import MissingWeightsError

    missing = tmp_path / "nope" / "ViT-B-16.safetensors"
    with pytest.raises(MissingWeightsError, match=re.escape(str(missing))):
        _clip("ViT-B-16", checkpoint_path=str(missing))
    with pytest.raises(ValueError, match=r"models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K") as info:
        _clip("ViT-B-16", cache_dir=str(tmp_path))
    assert str(tmp_path / "laion2b_s34b_b88k.safetensors") in str(info.value)
    assert "checkpoint_path" in str(info.value)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        _clip("no-such-model", pretrained=None)


def test_openclip_in_the_pyramid(tiny_clip_name):
    from lerf_ros.core.language.pyramid import ClipPyramid, PyramidConfig

    enc = _clip(tiny_clip_name, pretrained=None)
    p = ClipPyramid(enc, PyramidConfig(tile_fracs=(0.25, 0.5), batch_size=8))
    p.add(0, (torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8))
    out = p.sample(
        torch.zeros(3, dtype=torch.long), torch.tensor([[5.0, 5.0], [30, 20], [60, 40]]), torch.rand(3)
    )
    assert out.shape == (3, 32) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_openclip_takes_the_gpu_crop_format_and_batches_like_single_crops(tiny_clip_name):
    """The pyramid's CUDA crop batches (fp16, channels-last) give the fp32 embeddings to within fp16 input
    rounding; a pyramid encoding batches of crops equals one encoding a crop at a time (CPU)."""
    from lerf_ros.core.language.pyramid import ClipPyramid, PyramidConfig, encoder_batch

    enc = _clip(tiny_clip_name, pretrained=None)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    half_cl = encoder_batch(x, torch.device("cuda"))  # the format only; the model stays on the CPU
    assert half_cl.dtype == torch.float16 and half_cl.is_contiguous(memory_format=torch.channels_last)
    a, b = checked_encode_images(enc, x), checked_encode_images(enc, half_cl)
    assert float((a * b).sum(dim=1).min()) > 0.999 and float((a - b).abs().max()) < 1e-2
    image = (torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    grids = [ClipPyramid(enc, PyramidConfig(tile_fracs=(0.25, 0.5), batch_size=n)).compute(image)[1]
             for n in (1, 64)]
    torch.testing.assert_close(grids[0], grids[1], rtol=0, atol=1e-5)


@pytest.mark.cuda
def test_openclip_pyramid_on_cuda_encodes_fp16_channels_last(tiny_clip_name):
    from lerf_ros.core.language.pyramid import ClipPyramid, PyramidConfig

    gpu, cpu = _clip(tiny_clip_name, pretrained=None, device="cuda"), _clip(tiny_clip_name, pretrained=None)
    assert gpu.model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen, real = [], gpu.model.encode_image

    def spy(x):
        seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return real(x)

    gpu.model.encode_image = spy
    image = (torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    cfg = PyramidConfig(tile_fracs=(0.25, 0.5), batch_size=8)
    on_gpu = ClipPyramid(gpu, cfg, "cuda").compute(image)[1]
    assert seen and set(seen) == {(torch.float16, True)}
    on_cpu = ClipPyramid(cpu, cfg, "cpu").compute(image)[1]
    assert float((on_gpu.cpu() * on_cpu).sum(dim=1).min()) > 0.995  # fp16 weights and inputs


@pytest.mark.cuda
def test_openclip_fp16_on_cuda(tiny_clip_name):
    enc = _clip(tiny_clip_name, pretrained=None, device="cuda")
    assert next(enc.model.parameters()).dtype == torch.float16
    out = checked_encode_images(enc, torch.rand(4, 3, 32, 32, device="cuda"))
    assert out.dtype == torch.float32 and torch.allclose(
        out.norm(dim=1), torch.ones(4, device="cuda"), atol=1e-3
    )


# ---- DINO via timm (tiny random ViT) -------------------------------------------------------------

DINO = "lerf_ros.core.encoders.dino:dino_encoder"


def _dino(**kw):
    return load_encoder(EncoderSpec(DINO, tuple({"model_name": "test_vit", **kw}.items())), dense=True)


def test_dino_random_grid_shapes_and_stride():
    enc = _dino(random_init=True)  # timm's test_vit: patch 16, width 64
    img = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    f = enc.encode_dense(img)
    assert f.shape == (64, 3, 4) and torch.isfinite(f).all()
    assert torch.equal(f, _dino(random_init=True).encode_dense(img))
    dense = _dino(random_init=True, stride=8)  # overlapping patches: twice the grid
    assert dense.encode_dense(img).shape == (64, 6, 8)
    assert _dino(random_init=True, max_side=32).encode_dense(img).shape == (64, 2, 2)
    with pytest.raises(ValueError, match="stride"):
        _dino(random_init=True, stride=5)


def test_dino_loads_local_checkpoint_and_names_missing(tmp_path):
    from lerf_ros.core.encoders import MissingWeightsError

    other = _dino(random_init=True, seed=3)
    torch.save(other.model.state_dict(), tmp_path / "w.pth")
    enc = _dino(checkpoint_path=str(tmp_path / "w.pth"))
    img = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(enc.encode_dense(img), other.encode_dense(img), atol=1e-5)
    assert "w.pth" in enc.name
    with pytest.raises(MissingWeightsError, match=r"missing\.pth"):
        _dino(checkpoint_path=str(tmp_path / "missing.pth"))
    with pytest.raises(MissingWeightsError, match=r"dino_deitsmall16_pretrain\.pth"):
        load_encoder(EncoderSpec(DINO, (("cache_dir", str(tmp_path)),)), dense=True)


def test_dino_patch_size_comes_from_the_checkpoint_not_the_model_name(tmp_path):
    """An S/8 weights file is built as ViT-S/8 (LERF's DINO), not resampled into the default S/16."""
    import timm

    from lerf_ros.core.encoders.dino import checkpoint_architecture, model_for_checkpoint

    s8 = timm.create_model("vit_small_patch8_224.dino", pretrained=False, num_classes=0)
    torch.save({"teacher": {"backbone." + k: v for k, v in s8.state_dict().items()}}, tmp_path / "s8.pth")
    assert checkpoint_architecture(tmp_path / "s8.pth") == (8, 384)
    s8_name = "vit_small_patch8_224.dino"
    assert model_for_checkpoint("vit_small_patch16_224.dino", tmp_path / "s8.pth") == s8_name
    assert model_for_checkpoint(s8_name, tmp_path / "s8.pth") == s8_name
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="patch_embed"):
        checkpoint_architecture(tmp_path / "bad.pth")
