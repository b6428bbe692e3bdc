"""save/load: safetensors + JSON metadata, re-applied to a freshly built model, with clear mismatches."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import meansparse as ms

REPO = Path(__file__).resolve().parents[1]
#: What every site entry of a state file holds, since format version 1 (older readers look these keys up).
SITE_KEYS = {"index", "name", "activation", "layout", "channels", "centering", "after_residual_add", "module_path",
             "kind", "calibrated"}


def calibrated(model, images, **kw):
    model = ms.prepare(model, **kw)
    ms.calibrate(model, [images[:3], images[3:]], progress=False)
    return model


def test_round_trip(build_model, images, tmp_path):
    model = calibrated(build_model("resnet18"), images, exclude=r"^layer1\.", centering="zero")
    ms.set_alpha(model, 0.4)
    ms.set_alpha(model, {0: 0.1, "layer4.1.F.relu:1": 0.9})
    with torch.no_grad():
        want = model(images)
    path = tmp_path / "state.safetensors"
    ms.save(model, path)

    fresh = build_model("resnet18")  # same weights, freshly built
    loaded = ms.load(fresh, path)
    assert [s.name for s in ms.sites(loaded)] == [s.name for s in ms.sites(model)]
    assert ms.sites(loaded) == ms.sites(model)
    for a, b in zip(ms.operators(loaded), ms.operators(model), strict=True):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert a.alpha_value == b.alpha_value and a.centering == "zero" and a.calibrated
    with torch.no_grad():
        assert torch.equal(loaded(images), want)


def test_file_is_safetensors_with_json_metadata(build_model, images, tmp_path):
    model = calibrated(build_model("vit"), images)
    path = tmp_path / "s.safetensors"
    ms.save(model, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    json.loads(raw[8 : 8 + n])  # a plain JSON header, no pickle anywhere
    assert b"\x80\x04" not in raw[:2]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "meansparse"
    info = json.loads(meta["meansparse"])
    assert info["package_version"] == ms.__version__
    assert info["config"]["method"] == "fx" and info["config"]["centering"] == "channel"
    assert [(s["name"], s["layout"], s["channels"]) for s in info["sites"]] == [
        ("blocks.0.mlp.act", "NLC", 32),
        ("blocks.1.mlp.act", "NLC", 32),
    ]
    assert {"site.0.running_mean", "site.0.running_var", "site.0.alpha", "site.1.num_samples"} <= keys
    assert all(set(s) == SITE_KEYS for s in info["sites"])


def site_list(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["meansparse"])["sites"], {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_a_state_file_from_before_the_site_record_loads_and_saves_again_unchanged(tmp_path):
    """A file meansparse 0.1.0 wrote when the operator kept its site facts as separate attributes (the
    reference ReLU sweep): it loads into the operators' site records, and saving it again writes the same
    site list and tensors, so older readers read the new files too."""
    path = REPO / "experiments" / "results" / "sweep-relu-pgd" / "meansparse.safetensors"
    saved, tensors = site_list(path)
    model = ms.load(ms.models.load(str(REPO / "checkpoints" / "cifar10-resnet18-relu-pgd")), path)
    got = [{"index": s.index, "name": s.name, "activation": s.activation, "kind": s.kind,
            "module_path": s.module_path, "after_residual_add": s.after_residual_add, "layout": s.layout,
            "channels": s.channels} for s in ms.sites(model)]
    assert got == [{k: s[k] for k in got[0]} for s in saved] and len(got) == 17
    ms.save(model, tmp_path / "again.safetensors")
    again, again_tensors = site_list(tmp_path / "again.safetensors")
    assert again == saved
    assert again_tensors.keys() == tensors.keys() and all(torch.equal(again_tensors[k], v) for k, v in tensors.items())


def test_round_trip_modules_method(build_model, images, tmp_path, quiet):
    model = calibrated(build_model("untraceable"), images, example_inputs=images)
    ms.set_alpha(model, 0.7)
    with torch.no_grad():
        want = model(images)
    ms.save(model, tmp_path / "u.safetensors")
    loaded = ms.load(build_model("untraceable"), tmp_path / "u.safetensors")
    assert [s.name for s in ms.sites(loaded)] == ["act1", "act2"]
    with torch.no_grad():
        assert torch.equal(loaded(images), want)


def test_site_mismatch_is_reported(build_model, images, tmp_path):
    ms.save(calibrated(build_model("preact_wrn"), images), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"sites do not match.*file has 7, the model gives 3"):
        ms.load(build_model("se"), tmp_path / "w.safetensors")


def test_channel_mismatch_is_reported(build_model, images, tmp_path):
    ms.save(calibrated(build_model("preact_wrn"), images), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"site 'blocks.0.relu1' has 8 channels in the model but 4"):
        ms.load(build_model("preact_wrn", width=8), tmp_path / "w.safetensors")


def test_channel_mismatch_without_recorded_shape_fails_at_first_forward(build_model, images, tmp_path):
    model = ms.prepare(build_model("preact_wrn"))
    ops = ms.operators(model)
    for o in ops:  # statistics installed by hand: no input shape is recorded
        o.layout = "NCHW"
        o.set_statistics(torch.zeros(4), torch.ones(4))
    ms.save(model, tmp_path / "w.safetensors")
    with pytest.warns(UserWarning, match="different base model"):  # strict=True would refuse it at once
        loaded = ms.load(build_model("preact_wrn", width=8), tmp_path / "w.safetensors", strict=False)
    ms.set_alpha(loaded, 0.5)
    with pytest.raises(ValueError, match=r"blocks.0.relu1.*8 channels.*expects 4"):
        loaded(images)


def test_save_errors(build_model, tmp_path):
    with pytest.raises(ValueError, match="not prepared"):
        ms.save(build_model("se"), tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a meansparse state file"):
        ms.load(build_model("se"), tmp_path / "other.safetensors")


def test_uncalibrated_sites_round_trip(build_model, tmp_path):
    model = ms.prepare(build_model("se"), include="act1")
    ms.save(model, tmp_path / "u.safetensors")
    loaded = ms.load(build_model("se"), tmp_path / "u.safetensors")
    assert [s.name for s in ms.sites(loaded)] == ["act1"]
    assert not ms.operators(loaded)[0].calibrated


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    """Every writer of a state / checkpoint / cache file goes through atomic_path: an error mid-write must
    leave the previous file intact and no temporary behind."""
    from meansparse._utils import atomic_path

    target = tmp_path / "state.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    with atomic_path(tmp_path / "cache.npz", ".npz") as tmp:
        assert tmp.name.endswith(".npz") and tmp.name != "cache.npz"
        tmp.write_bytes(b"x")
    assert (tmp_path / "cache.npz").read_bytes() == b"x"


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    """Two runs filling one data cache at once crashed: both wrote ``cache.tmp.npz`` and the second
    ``os.replace`` found it gone.  Each call now gets its own temporary name; the last writer wins."""
    from meansparse._utils import atomic_path

    target = tmp_path / "cache.npz"
    with atomic_path(target, ".npz") as a, atomic_path(target, ".npz") as b:
        assert a != b
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert target.read_bytes() == b"a"  # the outer block ends last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]
