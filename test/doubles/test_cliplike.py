"""The CLIP-like test encoder has the relevancy statistics it promises (and is a valid plugin)."""

import numpy as np
import pytest
import torch
from lerf_test_doubles.cliplike import RELATED_PAIRS, ClipLikeEncoder, related

from lerf_ros.core.encoders import load_encoder
from lerf_ros.core.encoders.demo import CHROMATIC
from lerf_ros.core.language.relevancy import negative_texts, relevancy

HUE_RGB = {"red": (200, 30, 30), "orange": (220, 120, 20), "yellow": (220, 200, 30), "green": (30, 160, 40),
           "cyan": (30, 190, 200), "blue": (30, 60, 200), "purple": (130, 40, 200),
           "magenta": (190, 40, 170), "pink": (230, 40, 110)}


def _crops(rgb, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(rgb, dtype=torch.float32).reshape(1, 3, 1, 1) / 255
    shade = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
    return (c * shade * (0.9 + 0.1 * torch.rand(n, 1, 16, 16, generator=g))).clamp(0, 1)


@pytest.fixture(scope="module")
def enc():
    return ClipLikeEncoder()


def _rel(enc, crops, text):
    neg = enc.encode_texts(list(negative_texts()))
    return relevancy(enc.encode_images(crops), enc.encode_texts([text])[0], neg)


@pytest.mark.parametrize("name", [n for n, _ in CHROMATIC])
def test_target_related_unrelated_ranges(enc, name):
    crops = _crops(HUE_RGB[name])
    r = _rel(enc, crops, f"the {name} mug")
    assert 0.62 <= float(r.min()) and float(r.max()) <= 0.70
    for other in related(name):
        r = _rel(enc, crops, other)
        # 0.55-0.60 as the issue states, +-0.005 for hue leakage between neighbouring colour names
        assert 0.545 <= float(r.min()) and float(r.max()) <= 0.605, (name, other, r.min(), r.max())
    unrelated = [n for n, _ in CHROMATIC if n != name and n not in related(name)]
    for other in unrelated:
        r = _rel(enc, crops, other)
        assert 0.46 <= float(r.min()) and float(r.max()) <= 0.53, (name, other, r.min(), r.max())


def test_background_and_unknown_words_sit_at_one_half(enc):
    g = torch.Generator().manual_seed(3)
    grey = (0.3 + 0.6 * torch.rand(200, 1, 1, 1, generator=g)) * (0.85 + 0.3 * torch.rand(200, 1, 16, 16,
                                                                                             generator=g))
    crops = grey.expand(200, 3, 16, 16).clamp(0, 1)
    for text in ("red box", "blue", "chair"):
        r = _rel(enc, crops, text)
        assert abs(float(r.median()) - 0.5) < 0.01 and float(r.max()) < 0.53


def test_noise_is_content_dependent_and_deterministic(enc):
    a, b = _crops(HUE_RGB["red"], seed=1), _crops(HUE_RGB["red"], seed=2)
    assert torch.equal(enc.encode_images(a), enc.encode_images(a))
    r = _rel(enc, torch.cat([a, b]), "orange")
    assert float(r.std()) > 1e-3  # not a constant: varies with the crop's content


def test_related_table_is_symmetric_and_names_hue_neighbours():
    names = [n for n, _ in CHROMATIC]
    for i, n in enumerate(names):
        assert set(related(n)) >= {names[i - 1], names[(i + 1) % len(names)]}
    assert all(a != b for a, b in RELATED_PAIRS)


def test_selectable_as_a_plugin():
    e = load_encoder("lerf_test_doubles.cliplike:cliplike_encoder", "cpu")
    assert e.name.startswith("test-cliplike") and e.dim == 64
    t = e.encode_texts(["red box", "red"])
    assert np.isclose(float(t[0] @ t[1]), 1.0)  # shape words are ignored


def test_the_hard_variant_has_smaller_margins_and_more_noise(enc):
    hard = load_encoder("lerf_test_doubles.cliplike:cliplike_hard_encoder", "cpu")
    for name in ("red", "green", "blue", "purple"):
        crops = _crops(HUE_RGB[name], n=200)
        target, look_alike = _rel(hard, crops, name), _rel(hard, crops, related(name)[0])
        assert 0.57 <= float(target.mean()) <= 0.645, (name, target.mean())
        assert 0.53 <= float(look_alike.mean()) <= 0.60, (name, look_alike.mean())
        assert 0.02 <= float(target.mean() - look_alike.mean()) <= 0.06  # ~0.04, against ~0.085 for `enc`
        assert float(target.mean() - look_alike.mean()) < float(
            _rel(enc, crops, name).mean() - _rel(enc, crops, related(name)[0]).mean())
    noisy = torch.cat([_crops(HUE_RGB["red"], seed=s) for s in range(4)])
    assert float(_rel(hard, noisy, "orange").std()) > 2 * float(_rel(enc, noisy, "orange").std())
