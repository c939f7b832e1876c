"""ModelConfig parsing, validation, round trips and the bundled JSON configs."""

from __future__ import annotations

import json

import pytest
from emclip.config import (
    CONFIG_DIR,
    DecoderConfig,
    EMConfig,
    ImageEncoderConfig,
    ModelConfig,
    TextEncoderConfig,
    list_configs,
    load_config,
)
from emclip.errors import ConfigError
from emclip.factory import list_models

REQUIRED = {"tiny", "cpu-default", "vit-b-16", "biomedclip", "unet-baseline", "unet-tiny"}


def test_bundled_configs_exist_and_round_trip():
    assert REQUIRED <= set(list_models())
    assert list_models() == list_configs()
    for name in list_configs():
        cfg = load_config(name)
        assert cfg.name == name
        again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg, name


def test_unet_configs_know_fundus_and_cardiac_structures():
    for name in ("unet-baseline", "unet-tiny"):
        cfg = load_config(name)
        assert cfg.arch == "unet" and cfg.text_encoder is None
        assert cfg.class_names == [
            "optic disc", "optic cup", "neuroretinal rim", "left ventricle", "myocardium", "right ventricle"
        ]


def test_round_trip_of_non_default_values():
    cfg = ModelConfig(
        name="x",
        image_size=96,
        pixel_mean=(0.1, 0.2, 0.3),
        image_encoder=ImageEncoderConfig(vision_cfg={"layers": 1, "width": 16}, feature_indices=[0], freeze=True),
        text_encoder=TextEncoderConfig(text_cfg={"width": 16}, embed_dim=16, use_templates=False),
        em=EMConfig(enabled=False, num_bases=5, grad_mode="full", lam=2.5),
        decoder=DecoderConfig(text_guidance=False, text_adapter="linear", num_heads=4, channels=64),
    )
    data = cfg.to_dict()
    assert isinstance(data["pixel_mean"], list)
    restored = ModelConfig.from_dict(data)
    assert restored == cfg
    assert restored.pixel_mean == (0.1, 0.2, 0.3)
    assert restored.image_encoder.feature_indices == [0]
    assert restored.em.enabled is False and restored.decoder.text_guidance is False


def test_unknown_top_level_key_names_key_and_allowed_keys():
    data = load_config("tiny").to_dict()
    data["imgae_size"] = 64
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    msg = str(info.value)
    assert "imgae_size" in msg and "image_size" in msg and "decoder" in msg


def test_unknown_nested_key_names_section_path():
    data = load_config("tiny").to_dict()
    data["em"]["num_base"] = 4
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    msg = str(info.value)
    assert "em.num_base" in msg and "num_bases" in msg and "grad_mode" in msg


@pytest.mark.parametrize(
    "path, value, words",
    [
        (("image_size",), "64", ["image_size", "integer"]),
        (("image_size",), True, ["image_size", "integer"]),
        (("em", "lam"), "big", ["em.lam", "number"]),
        (("pixel_mean",), [0.5, 0.5], ["pixel_mean", "3"]),
        (("em", "grad_mode"), "sometimes", ["grad_mode", "last"]),
        (("arch",), "segformer", ["segformer", "emclip"]),
        (("decoder", "num_heads"), 5, ["divisible"]),
        (("em", "momentum"), 1.0, ["momentum"]),
        (("text_encoder",), None, ["text_encoder"]),
    ],
)
def test_invalid_values_raise_config_error_saying_what(path, value, words):
    data = load_config("tiny").to_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    for word in words:
        assert word in str(info.value)


def test_unet_needs_class_names_and_checks_synonyms():
    data = load_config("unet-tiny").to_dict()
    data["class_names"] = []
    with pytest.raises(ConfigError, match="class_names"):
        ModelConfig.from_dict(data)
    data = load_config("unet-tiny").to_dict()
    data["synonyms"] = {"optic cupp": ["cup"]}
    with pytest.raises(ConfigError, match="optic cupp"):
        ModelConfig.from_dict(data)


def test_float_fields_accept_ints_and_meta_keys_are_ignored():
    data = load_config("tiny").to_dict()
    data["em"]["lam"] = 2
    data.update(format_version=1, emclip_version="0.1.0", weights_dtype="float16")
    cfg = ModelConfig.from_dict(data)
    assert cfg.em.lam == 2.0 and isinstance(cfg.em.lam, float)


def test_load_config_sources(tmp_path):
    cfg = load_config("tiny")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**cfg.to_dict(), "format_version": 1}))
    assert load_config(folder) == cfg
    assert load_config(cfg.to_dict()) == cfg
    copy = load_config(cfg)
    assert copy == cfg and copy is not cfg


def test_overrides_use_dotted_keys_and_are_validated():
    cfg = load_config("tiny", overrides={"em.num_bases": 3, "image_encoder.pretrained": "local-dir:/x", "name": "t2"})
    assert cfg.em.num_bases == 3 and cfg.image_encoder.pretrained == "local-dir:/x" and cfg.name == "t2"
    with pytest.raises(ConfigError, match="em.bases"):
        load_config("tiny", overrides={"em.bases": 3})


def test_unknown_name_lists_bundled_configs():
    with pytest.raises(ConfigError) as info:
        load_config("tinyy")
    assert "tiny" in str(info.value) and "cpu-default" in str(info.value)


def test_invalid_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "arch": "emclip",\n  "image_size": ,\n}')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "bad.json" in str(info.value) and "line 3" in str(info.value)


def test_bundled_json_files_are_the_registry():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    assert names == list_configs()
