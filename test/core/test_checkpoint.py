"""Map directory format: round trip, and every kind of bad file gets a ValueError naming the file."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from lerf_ros.core import checkpoint as ck


def _map_data(k: int = 2, h: int = 6, w: int = 8) -> ck.MapData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (k, h, w, 3), dtype=np.uint8)
    keyframes = {
        "ids": np.arange(10, 10 + k, dtype=np.int64),
        "images": images,
        "T_world_cam": np.tile(np.eye(4), (k, 1, 1)),
    }
    hashes = {int(i): ck.frame_hash(images[r]) for r, i in enumerate(keyframes["ids"])}
    return ck.MapData(
        config={"name": "tiny", "x": [1, 2]},
        encoders={"clip": "colour-names-v1", "dino": "colour-dense-v1"},
        step=42,
        scene_box=np.array([[-1.0, -1.0, 0.0], [1.0, 1.0, 2.0]]),
        model_state={"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)},
        trainer_state={"step_count": 42},
        keyframes=keyframes,
        features={"hashes": hashes, "caches": {"clip": {"encoder_name": "x", "grid": torch.randn(3, 4)}}},
    )


def test_round_trip(tmp_path):
    data = _map_data()
    ck.save_map(tmp_path / "m", data)
    back = ck.load_map(tmp_path / "m")
    assert back.step == 42 and back.config == data.config and back.encoders == data.encoders
    np.testing.assert_array_equal(back.scene_box, data.scene_box)
    assert torch.equal(back.model_state["w"], data.model_state["w"])
    for k, v in data.keyframes.items():
        np.testing.assert_array_equal(back.keyframes[k], v)
    assert torch.equal(back.features["caches"]["clip"]["grid"], data.features["caches"]["clip"]["grid"])
    assert not list((tmp_path / "m").glob("*.tmp"))


def _saved(tmp_path):
    root = tmp_path / "m"
    ck.save_map(root, _map_data())
    return root


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ck.load_map(tmp_path / "nope")
    root = _saved(tmp_path)
    (root / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json"):
        ck.load_map(root)


@pytest.mark.parametrize("name", [ck.WEIGHTS, ck.KEYFRAMES, ck.FEATURES])
def test_missing_file(tmp_path, name):
    root = _saved(tmp_path)
    (root / name).unlink()
    with pytest.raises(ValueError, match=f"{name}: missing"):
        ck.load_map(root)


@pytest.mark.parametrize("name", [ck.WEIGHTS, ck.KEYFRAMES, ck.FEATURES, ck.MANIFEST])
def test_truncated_file(tmp_path, name):
    root = _saved(tmp_path)
    blob = (root / name).read_bytes()
    (root / name).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        ck.load_map(root)


def test_checksum_mismatch_same_size(tmp_path):
    root = _saved(tmp_path)
    blob = bytearray((root / ck.WEIGHTS).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (root / ck.WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"weights\.pt: checksum mismatch"):
        ck.load_map(root)


def test_wrong_version_and_foreign_manifest(tmp_path):
    root = _saved(tmp_path)
    manifest = json.loads((root / "config.json").read_text())
    manifest["version"] = 99
    (root / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99"):
        ck.load_map(root)
    (root / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a lerf_ros-map manifest"):
        ck.load_map(root)


def test_foreign_file_with_matching_checksum(tmp_path):
    # A file that is not a torch archive, with the manifest updated to match: still a clear error.
    root = _saved(tmp_path)
    junk = b"this is not a torch file" * 10
    (root / ck.WEIGHTS).write_bytes(junk)
    manifest = json.loads((root / "config.json").read_text())
    manifest["files"][ck.WEIGHTS] = {"sha256": ck.sha256_hex(junk), "bytes": len(junk)}
    (root / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"weights\.pt: cannot be read"):
        ck.load_map(root)


def test_keyframe_shape_mismatch(tmp_path):
    data = _map_data()
    data.keyframes["ids"] = np.arange(3, dtype=np.int64)  # 3 ids for 2 images
    ck.save_map(tmp_path / "m", data)
    with pytest.raises(ValueError, match=r"keyframes\.npz: images uint8 \(2, 6, 8, 3\) do not match 3"):
        ck.load_map(tmp_path / "m")


def test_feature_hash_mismatch(tmp_path):
    data = _map_data()
    data.features["hashes"][11] = ck.frame_hash(np.zeros((6, 8, 3), np.uint8))
    ck.save_map(tmp_path / "m", data)
    with pytest.raises(ValueError, match=r"features\.pt: features of keyframe 11 were computed from other"):
        ck.load_map(tmp_path / "m")


def test_state_shape_mismatch():
    model = torch.nn.Linear(3, 2)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    ck.check_state_shapes(model, good, "weights.pt")
    bad = dict(good, weight=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"weights\.pt: weight has shape \(2, 4\)"):
        ck.check_state_shapes(model, bad, "weights.pt")
    with pytest.raises(ValueError, match="missing"):
        ck.check_state_shapes(model, {"weight": good["weight"]}, "weights.pt")


# --------------------------------------------------------------------------- saved query candidates


def _rewrite_entry(root, name):
    """Re-list ``name`` in the manifest with its current checksum (simulates a consistent older save)."""
    manifest = json.loads((root / ck.MANIFEST).read_text())
    blob = (root / name).read_bytes()
    manifest["files"][name] = {"sha256": ck.sha256_hex(blob), "bytes": len(blob)}
    (root / ck.MANIFEST).write_text(json.dumps(manifest))


def test_candidates_saved_and_reused_without_rendering(tmp_path):
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.language import candidates
    from lerf_ros.core.presets import make_preset
    from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory

    room = SyntheticRoom(0)
    frames = [dataclasses.replace(f, depth_m=None) for f in
              make_frames(room, orbit_trajectory(room, 4), default_intrinsics(48, 36))]
    cfg = make_preset("tiny")
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, min_keyframes=2))
    engine = LERFEngine(cfg, "cpu")
    for f in frames:
        engine.add_frame(f)
    while engine.train_step < 2:
        engine.step(2)
    n_kf = len(engine.store)
    calls = candidates.render_calls()
    engine.save(tmp_path / "m2")  # candidates completed at save: every keyframe lacks depth
    # (the training steps may have rendered some grids already; the save renders the others)
    assert candidates.render_calls() - calls <= n_kf
    assert sorted(engine.candidates.current.grid_ids.tolist()) == sorted(engine.store.ids())
    assert ck.CANDIDATES in json.loads((tmp_path / "m2" / ck.MANIFEST).read_text())["files"]
    want = engine.query("red box", with_cloud=False)

    loaded = LERFEngine.load(tmp_path / "m2", "cpu")
    calls = candidates.render_calls()
    got = loaded.query("red box", with_cloud=False)
    assert candidates.render_calls() == calls  # first query after load: no depth rendered
    assert got.model_step == want.model_step == 2 and got.found == want.found
    np.testing.assert_allclose(got.relevancy, want.relevancy, atol=1e-5)

    # A set saved at another model step is stale: written under step 3's weights it is recomputed.
    engine.step(1)
    engine.save(tmp_path / "m3")
    (tmp_path / "m3" / ck.CANDIDATES).write_bytes((tmp_path / "m2" / ck.CANDIDATES).read_bytes())
    _rewrite_entry(tmp_path / "m3", ck.CANDIDATES)
    stale = LERFEngine.load(tmp_path / "m3", "cpu")
    calls = candidates.render_calls()
    assert stale.query("red box", with_cloud=False).model_step == 3
    assert candidates.render_calls() == calls + n_kf


def test_bad_candidates_file_named(tmp_path):
    from lerf_ros.core.language.candidates import CandidateSet

    data = _map_data()
    good = CandidateSet(np.zeros((4, 3)), np.zeros((4, 3), np.uint8), np.ones(4, np.int64), "k@1")
    data.candidates = good.to_arrays()
    ck.save_map(tmp_path / "m", data)
    back = ck.load_map(tmp_path / "m")
    assert CandidateSet.from_arrays(back.candidates).key == "k@1"
    data.candidates = dict(good.to_arrays(), rgb=np.zeros((3, 3), np.uint8))
    ck.save_map(tmp_path / "m", data)
    with pytest.raises(ValueError, match=r"candidates\.npz: .*do not fit"):
        ck.load_map(tmp_path / "m")
    data.candidates = None  # a later save without a set drops the old file and its manifest entry
    ck.save_map(tmp_path / "m", data)
    assert ck.load_map(tmp_path / "m").candidates is None and not (tmp_path / "m" / ck.CANDIDATES).exists()


# --------------------------------------------------------------------------- portable maps (backends)


@pytest.fixture(scope="module")
def trained_map(tmp_path_factory):
    """A tiny-preset map trained 3 steps on the CPU, saved; (engine, map directory)."""
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.presets import make_preset
    from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory

    room = SyntheticRoom(0)
    cfg = make_preset("tiny")
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, min_keyframes=2))
    engine = LERFEngine(cfg, "cpu")
    for f in make_frames(room, orbit_trajectory(room, 4), default_intrinsics(48, 36)):
        engine.add_frame(f)
    while engine.train_step < 3:
        engine.step(3)
    root = tmp_path_factory.mktemp("portable") / "map"
    engine.save(root)
    return engine, root


def _rewrite_weights(root, weights: dict) -> None:
    (root / ck.WEIGHTS).write_bytes(ck.torch_bytes(weights))
    _rewrite_entry(root, ck.WEIGHTS)


def _copy_map(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


_PTS = torch.tensor([[0.1, 0.2, 0.3], [-0.4, 0.5, 0.9], [0.0, 0.0, 0.5], [0.7, -0.6, 0.2]])


def test_map_records_backends_and_old_maps_load(trained_map, tmp_path):
    engine, root = trained_map
    data = ck.load_map(root)
    assert data.backends["radiance.grid"] == "torch" and data.backends["radiance.density_mlp"] == "torch"
    assert set(data.backends) >= {"radiance.color_mlp", "language.clip_head", "language.grids.0"}
    assert not any(k.endswith("_tcnn.params") for k in data.model_state)
    # A map written before backends were recorded: no "backends" entry in weights.pt.
    old = _copy_map(root, tmp_path / "old")
    weights = ck.torch_load((old / ck.WEIGHTS).read_bytes(), old / ck.WEIGHTS)
    del weights["backends"]
    _rewrite_weights(old, weights)
    assert ck.load_map(old).backends is None
    loaded = type(engine).load(old, "cpu")
    torch.testing.assert_close(loaded.model.density_at_points(_PTS), engine.model.density_at_points(_PTS),
                               rtol=0, atol=0)


def test_tcnn_layout_map_loads_on_cpu_and_trains(trained_map, tmp_path):
    """A map as a tinycudann machine writes it (flat FullyFusedMLP vectors, the old duplicate hash-grid
    key) loads into the PyTorch modules with the same outputs, and training goes on."""
    from lerf_ros.core.fields import MLP, HashEncoding
    from lerf_ros.core.fields import layouts as lay

    engine, root = trained_map
    src = type(engine).load(root, "cpu")
    with torch.no_grad():  # into tinycudann's function class: no hidden / output biases
        for _, mod in lay.backend_modules(src.model):
            if isinstance(mod, MLP) and mod.config.hidden_dim in (16, 32, 64, 128):
                for i, layer in enumerate(m for m in mod.net if isinstance(m, torch.nn.Linear)):
                    if i > 0 or mod.in_dim % 16 == 0:
                        layer.bias.zero_()
    state = {k: v.detach().clone() for k, v in src.model.state_dict().items()}
    backends = {}
    for path, mod in lay.backend_modules(src.model):
        backends[path] = "torch"
        if isinstance(mod, HashEncoding):
            state[f"{path}._tcnn.params"] = state[f"{path}.params"].clone()
            backends[path] = "tcnn"
        elif mod.config.hidden_dim in (16, 32, 64, 128):
            own = {k[len(path) + 1:]: state.pop(k) for k in list(state) if k.startswith(path + ".")}
            state[f"{path}.net.params"] = lay.torch_mlp_to_tcnn(own, *lay._mlp_shape(mod), module=path)
            backends[path] = "tcnn"
    assert sum(b == "tcnn" for b in backends.values()) >= 8
    tc = _copy_map(root, tmp_path / "tcnn")
    weights = ck.torch_load((tc / ck.WEIGHTS).read_bytes(), tc / ck.WEIGHTS)
    # Its optimisers hold fewer, flat parameters per group (one vector per MLP): those moments cannot load.
    for opt in weights["trainer"]["optimizers"].values():
        group = opt["param_groups"][0]
        for idx in group["params"][-3:]:
            opt["state"].pop(idx, None)
        group["params"] = group["params"][:-3]
    _rewrite_weights(tc, {**weights, "model": state, "backends": backends})
    loaded = type(engine).load(tc, "cpu")
    assert loaded.train_step == src.train_step
    assert all(not o.state for o in loaded.trainer.optimizers.values())
    assert set(ck.module_backends(loaded.model).values()) == {"torch"}
    torch.testing.assert_close(loaded.model.density_at_points(_PTS), src.model.density_at_points(_PTS),
                               rtol=1e-5, atol=1e-6)
    want, got = src.query("red box", with_cloud=False), loaded.query("red box", with_cloud=False)
    assert got.found == want.found and got.relevancy == pytest.approx(want.relevancy, abs=1e-4)
    before = loaded.train_step
    loaded.step(2)  # the converted groups' Adam moments restarted; the others loaded
    assert loaded.train_step == before + 2
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())

    # A tinycudann vector of the wrong size cannot become this model's MLP: named error.
    bad = dict(state)
    bad["radiance.density_mlp.net.params"] = bad["radiance.density_mlp.net.params"][:-16]
    _rewrite_weights(tc, {**weights, "model": bad, "backends": backends})
    with pytest.raises(ValueError, match=r"weights\.pt: module 'radiance\.density_mlp': tinycudann param"):
        type(engine).load(tc, "cpu")


def test_bad_backend_record_is_named(tmp_path):
    data = _map_data()
    data.backends = {"radiance.grid": 3}
    ck.save_map(tmp_path / "m", data)
    with pytest.raises(ValueError, match=r"weights\.pt: backends must map module paths"):
        ck.load_map(tmp_path / "m")
