"""flexo.package: an expert package read and checked — its manifest's types, its owner bound to its
folder's name, the public fingerprint, the tensor names, shapes and dtypes from the header, the sha256 of
the bytes — on the tiny project's real packages and broken copies of them."""

from __future__ import annotations

import pytest
import torch

from conftest import edit_manifest, package_copy
from flexo.errors import FlexoError
from flexo.modeling import read_meta
from flexo.package import FORMAT, ExpertPackage, package_shapes

SIZES = (2, 32, 64)  # the tiny model's layers, hidden size, intermediate size


@pytest.fixture(scope="module")
def public_fp(tiny_project) -> str:
    return read_meta(tiny_project.public_model)["fingerprint"]


@pytest.mark.parametrize("owner", ["alpha", "beta"])
def test_the_tiny_projects_packages_read_check_and_verify(tiny_project, public_fp, owner):
    pkg = ExpertPackage.read(tiny_project.expert(owner), owner=owner)
    assert (pkg.owner, pkg.num_layers, pkg.hidden_size, pkg.intermediate_size) == (owner, *SIZES)
    assert pkg.public_fingerprint == public_fp and pkg.meta["format"] == FORMAT
    assert pkg.shapes == package_shapes(*SIZES) and len(pkg.shapes) == 4 * SIZES[0]
    assert pkg.where == f"expert package {tiny_project.expert(owner)} (owner {owner})"
    pkg.check(public_fingerprint=public_fp, sizes=SIZES, dtype="F32")
    pkg.verify()


def test_the_owner_is_bound_to_the_folder(tiny_project, tmp_path):
    moved = package_copy(tiny_project, "alpha", tmp_path / "gamma")
    with pytest.raises(FlexoError, match="says owner 'alpha' but the package lies in a folder named 'gamma'"):
        ExpertPackage.read(moved)
    with pytest.raises(FlexoError, match="says owner 'alpha' where 'beta' was expected"):
        ExpertPackage.read(tiny_project.expert("alpha"), owner="beta")
    with pytest.raises(FlexoError, match="is not an expert package \\(no expert.json\\)"):
        ExpertPackage.read(tmp_path)


@pytest.mark.parametrize("changes, words", [
    ({"num_layers": True}, "num_layers must be a positive integer, got True"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
    ({"owner": "public"}, "names owner 'public', the name of expert 0"),
    ({"owner": "alpha\n"}, "not allowed"),
    ({"public_fingerprint": 5}, "public_fingerprint must be a sha256 string, got 5"),
    ({"tensors_sha256": "abc"}, "tensors_sha256 must be 64 hex digits, got 'abc'"),
    ({"tensors_sha256": None}, "has no tensors_sha256"),
])
def test_bad_manifests_are_one_line(tiny_project, tmp_path, changes, words):
    pkg = package_copy(tiny_project, "alpha", tmp_path / "alpha")
    edit_manifest(pkg, **changes)
    with pytest.raises(FlexoError, match=words) as e:
        ExpertPackage.read(pkg)
    assert "\n" not in str(e.value)


def test_check_refuses_another_public_model_sizes_and_dtype(tiny_project, public_fp):
    pkg = ExpertPackage.read(tiny_project.expert("beta"))
    with pytest.raises(FlexoError, match=f"fingerprint {public_fp[:12]}…, but this public model's fingerprint is "
                                         "000000000000…: retrain it with `flexo train-expert --owner beta`"):
        pkg.check(public_fingerprint="0" * 64, sizes=SIZES, dtype="F32")
    with pytest.raises(FlexoError, match=r"= \(2, 32, 64\) but the public model has \(2, 32, 128\)"):
        pkg.check(public_fingerprint=public_fp, sizes=(2, 32, 128), dtype="F32")
    with pytest.raises(FlexoError, match=r"layers.0.gate_proj is F32 \(64, 32\), the public model needs BF16 \(64, 32\)"):
        pkg.check(public_fingerprint=public_fp, sizes=SIZES, dtype="BF16")


def test_verify_catches_a_changed_byte_and_write_round_trips(tiny_project, tmp_path):
    pkg_dir = package_copy(tiny_project, "alpha", tmp_path / "alpha")
    data = bytearray((pkg_dir / "expert.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last tensor: the header still parses
    (pkg_dir / "expert.safetensors").write_bytes(bytes(data))
    pkg = ExpertPackage.read(pkg_dir)
    pkg.check(public_fingerprint=pkg.public_fingerprint, sizes=SIZES, dtype="F32")  # the header is fine
    with pytest.raises(FlexoError, match="hashes to .* \\(corrupt or truncated copy\\): fetch the package again"):
        pkg.verify()

    tensors = {k: torch.zeros(shape) for k, shape in package_shapes(1, 4, 8).items()}
    meta = ExpertPackage.write(tmp_path / "out" / "delta", tensors, {"owner": "delta", "public_fingerprint": "f" * 64,
                                                                     "num_layers": 1, "hidden_size": 4,
                                                                     "intermediate_size": 8})
    again = ExpertPackage.read(tmp_path / "out" / "delta", owner="delta")
    assert again.tensors_sha256 == meta["tensors_sha256"] and again.meta["format"] == FORMAT
    again.check(public_fingerprint="f" * 64, sizes=(1, 4, 8), dtype="F32")
    again.verify()
