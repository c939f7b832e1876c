"""The npe2 manifest: valid, discoverable, and every contribution resolves and works."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from npe2 import PluginManifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest() -> PluginManifest:
    return PluginManifest.from_distribution("napari-emclip")


def _npe2() -> list[str]:
    exe = shutil.which("npe2") or str(Path(sys.executable).with_name("npe2"))
    return [exe]


def test_npe2_validate_passes():
    out = subprocess.run(
        _npe2() + ["validate", "napari-emclip", "--imports"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_npe2_validate_rejects_a_broken_manifest(tmp_path):
    # the same command must fail on a manifest whose command id lacks the plugin prefix
    bad = (
        (ROOT / "napari.yaml")
        .read_text()
        .replace("id: napari-emclip.make_widget", "id: other.make_widget", 1)
    )
    path = tmp_path / "napari.yaml"
    path.write_text(bad)
    out = subprocess.run(
        _npe2() + ["validate", str(path)], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode != 0


def test_entry_point_and_symlinked_manifest():
    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-emclip"]
    assert [ep.value for ep in eps] == ["napari_emclip:napari.yaml"]
    packaged = ROOT / "napari_emclip" / "napari.yaml"
    assert packaged.is_symlink() and packaged.resolve() == (ROOT / "napari.yaml").resolve()


def test_contributions_resolve(manifest):
    assert manifest.name == "napari-emclip"
    commands = {c.id: c for c in manifest.contributions.commands}
    assert all(cid.startswith("napari-emclip.") for cid in commands)
    for command in commands.values():
        module, attr = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), command.python_name
    widgets = {commands[w.command].python_name for w in manifest.contributions.widgets}
    assert widgets == {"napari_emclip._widget:EMClipWidget", "napari_emclip._training_widget:TrainingWidget"}
    assert {s.key for s in manifest.contributions.sample_data} == {"fundus", "cardiac_mri"}
    writers = {w.command: w for w in manifest.contributions.writers}
    tiff = writers["napari-emclip.write_labels"]
    assert tiff.layer_types == ["labels"] and set(tiff.filename_extensions) == {".tif", ".tiff"}
    nifti = writers["napari-emclip.write_labels_nifti"]
    assert nifti.layer_types == ["labels"] and set(nifti.filename_extensions) == {".nii", ".nii.gz"}
    [reader] = manifest.contributions.readers
    assert set(reader.filename_patterns) == {"*.nii", "*.nii.gz"}


def test_napari_saves_labels_through_the_plugin_writer(tmp_path):
    from emclip.io import read_mask_tiff
    from napari.layers import Labels
    from npe2 import PluginManager

    PluginManager.instance().discover()  # what napari does at start-up

    data = np.zeros((16, 16), np.uint8)
    data[4:9, 4:9] = 2
    layer = Labels(data, name="optic cup", features={"index": [2], "name": ["optic cup"]})
    written = layer.save(str(tmp_path / "cup.tif"), plugin="napari-emclip")
    assert written and Path(written[0]).exists()
    back = read_mask_tiff(written[0])
    assert back.prompts == ["optic cup"]
    np.testing.assert_array_equal(back.masks[0], data == 2)
