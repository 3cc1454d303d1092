"""CLIP standardisation of the language field: the head predicts (t - mean) / scale."""

import torch
import torch.nn.functional as F

from lerf_ros.core.fields.hash_encoding import HashEncodingConfig
from lerf_ros.core.fields.language_field import LanguageField, LanguageFieldConfig
from lerf_ros.core.fields.mlp import MLPConfig
from lerf_ros.core.fields.scene_box import SceneBox

CFG = LanguageFieldConfig((HashEncodingConfig(2, 2, 8, 4, 16, "torch"),), MLPConfig(1, 16), MLPConfig(1, 8))
BOX = SceneBox((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))


def _targets(n=200, d=6, seed=0):
    """Unit embeddings sharing a large common component, as CLIP's do."""
    g = torch.Generator().manual_seed(seed)
    common = torch.zeros(d)
    common[0] = 1.0
    return F.normalize(common + 0.08 * torch.randn(n, d, generator=g), dim=1)


def test_standardisation_round_trips_and_spreads_the_targets():
    field = LanguageField(CFG, BOX, 6, 0)
    t = _targets()
    assert not field.standardised
    torch.testing.assert_close(field.unstandardise(t), t)  # identity before it is set (LERF's field)
    field.set_clip_standardisation(t)
    assert field.standardised
    z = field.standardise(t)
    assert abs(float(z.norm(dim=1).pow(2).mean()) - 1.0) < 1e-4  # unit RMS: the differences now matter
    assert float(t.std(dim=0).mean()) < 0.1 < float(z.std(dim=0).mean())
    torch.testing.assert_close(field.unstandardise(z), t, atol=1e-5, rtol=0)
    feats = field.features(torch.zeros(4, 3))
    out = field.clip(feats, torch.ones(4))
    ref = F.normalize(field.clip_mean + field.clip_scale * field.clip_residual(feats, torch.ones(4)), dim=1)
    torch.testing.assert_close(out, ref)


def test_maps_saved_without_standardisation_load_as_the_plain_field():
    field = LanguageField(CFG, BOX, 6, 0)
    field.set_clip_standardisation(_targets())
    state = {k: v for k, v in field.state_dict().items() if k not in ("clip_mean", "clip_scale")}
    old = LanguageField(CFG, BOX, 6, 0)
    old.set_clip_standardisation(_targets(seed=1))
    old.load_state_dict(state)
    assert not old.standardised and float(old.clip_mean.abs().sum()) == 0.0 and float(old.clip_scale) == 1.0
    again = LanguageField(CFG, BOX, 6, 0)
    again.load_state_dict(field.state_dict())
    assert again.standardised and torch.equal(again.clip_mean, field.clip_mean)
