"""Reference exemplars and template banks (emclip.exemplars), visual prompts in the decoder
(EMCLIP.encode_exemplar_prompts, DecoderPrompts), and segment(..., exemplars=...)."""

from __future__ import annotations

import json

import emclip
import emclip.io
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from emclip.errors import InvalidArgumentError, InvalidExemplarError, InvalidPromptError
from emclip.exemplars import Exemplar, TemplateBank
from emclip.inference import exemplar_prompts
from emclip.metrics import dice
from emclip.nn import DecoderPrompts, build_prompt_batch
from emclip.nn.emclip import _contrast_direction


def _blob_image(seed: int = 0, size: int = 96, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy grey image with a bright disc (the structure) and a darker square (a distractor)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.3, 0.05, (size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size * 0.4 - shift) ** 2 + (xx - size * 0.45 + shift) ** 2 < (size * 0.16) ** 2
    img[disc] += 0.5
    img[int(size * 0.7) : int(size * 0.9), int(size * 0.1) : int(size * 0.3)] -= 0.2
    return img, disc


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return emclip.create_model("tiny").eval()


# ----------------------------------------------------------------------------- Exemplar


def test_exemplar_validates_and_freezes_its_arrays():
    img, disc = _blob_image()
    ex = Exemplar(img, disc.astype(np.uint8) * 7, "  optic\tcup ")
    assert ex.name == "optic cup" and ex.mask.dtype == bool and ex.mask.sum() == disc.sum()
    assert not ex.image.flags.writeable and not ex.mask.flags.writeable
    img[0, 0] = 99.0  # the exemplar kept its own copy
    assert ex.image[0, 0] != 99.0
    other = Exemplar(ex.image, ~disc, "optic cup")
    assert other.image_key == ex.image_key and other.key != ex.key
    assert Exemplar(ex.image, disc, "optic cup", "fundus").key != ex.key


@pytest.mark.parametrize(
    "image, mask, name, fragment",
    [
        (np.zeros((32, 32)), np.zeros((32, 32)), "cup", "empty"),
        (np.zeros((32, 32)), np.ones((32, 31)), "cup", "32x31"),
        (np.zeros((32, 32)), np.ones((2, 32, 32)), "cup", "2D array"),
        (np.zeros((32, 32)), np.ones((32, 32)), "   ", "name is empty"),
        (np.zeros((32, 32)), np.ones((32, 32)), 3, "name must be text"),
        (np.zeros((2, 2)), np.ones((2, 2)), "cup", "exemplar image"),
        (np.zeros((32, 32)), np.full((32, 32), np.nan), "cup", "NaN"),
    ],
)
def test_bad_exemplars_raise_a_clear_value_error(image, mask, name, fragment):
    with pytest.raises(InvalidExemplarError, match=fragment) as info:
        Exemplar(image, mask, name)
    assert isinstance(info.value, ValueError)


def test_bad_exemplar_arguments_to_segment(tiny):
    img, _ = _blob_image()
    with pytest.raises(InvalidExemplarError, match="not an Exemplar"):
        emclip.segment(img, "blob", tiny, exemplars=[img])
    with pytest.raises(InvalidExemplarError, match="TemplateBank.load"):
        emclip.segment(img, "blob", tiny, exemplars="bank/")
    ex = Exemplar(*_blob_image(), "blob")
    with pytest.raises(InvalidArgumentError, match="exemplar_mode"):
        emclip.segment(img, "blob", tiny, exemplars=[ex], exemplar_mode="both")
    with pytest.raises(InvalidArgumentError, match="coarse_to_fine"):
        emclip.segment(img, "blob", tiny, exemplars=[ex], coarse_to_fine=True)
    unet = emclip.create_model("unet-tiny").eval()
    with pytest.raises(InvalidArgumentError, match="EM-CLIP"):
        emclip.segment(img, None, unet, exemplars=[ex])


# ----------------------------------------------------------------------------- TemplateBank


def test_bank_round_trip_stores_a_shared_image_once(tmp_path):
    img, disc = _blob_image()
    rgb = (np.random.default_rng(1).random((40, 50, 3)) * 65535).astype(np.uint16)
    ring = np.zeros((40, 50), bool)
    ring[5:20, 10:30] = True
    bank = TemplateBank([Exemplar(img, disc, "disc", "fundus"), Exemplar(img, ~disc, "background"), Exemplar(rgb, ring, "ring")])
    folder = bank.save(tmp_path / "bank")
    doc = json.loads((folder / "bank.json").read_text())
    assert [e["name"] for e in doc["exemplars"]] == ["disc", "background", "ring"]
    assert len(list((folder / "images").iterdir())) == 2  # the shared image once
    loaded = TemplateBank.load(folder)
    assert loaded.names() == ["disc", "background", "ring"]
    for a, b in zip(bank, loaded):
        assert a.image.dtype == b.image.dtype and np.array_equal(a.image, b.image)
        assert np.array_equal(a.mask, b.mask) and a.modality == b.modality and a.key == b.key
    assert not list(tmp_path.glob(".bank.*"))  # no temporary folder left behind


def test_bank_save_refuses_to_clobber_and_load_reports_bad_folders(tmp_path):
    bank = TemplateBank([Exemplar(*_blob_image(), "disc")])
    folder = bank.save(tmp_path / "bank")
    with pytest.raises(FileExistsError):
        bank.save(folder)
    bank.append(Exemplar(*_blob_image(2), "cup"))
    bank.save(folder, overwrite=True)
    assert TemplateBank.load(folder).names() == ["disc", "cup"]
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(InvalidExemplarError, match="not a template bank"):
        bank.save(other, overwrite=True)
    assert (other / "keep.txt").exists()
    with pytest.raises(InvalidExemplarError, match="empty"):
        TemplateBank().save(tmp_path / "empty")
    with pytest.raises(InvalidExemplarError, match="bank.json is missing"):
        TemplateBank.load(other)
    doc = json.loads((folder / "bank.json").read_text())
    doc["exemplars"][0]["mask"] = "../../etc/passwd"
    (folder / "bank.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidExemplarError, match="outside the bank folder"):
        TemplateBank.load(folder)
    (folder / "bank.json").write_text("{not json")
    with pytest.raises(InvalidExemplarError, match="not valid JSON"):
        TemplateBank.load(folder)
    with pytest.raises(InvalidExemplarError, match="not an Exemplar"):
        TemplateBank([1])


# ----------------------------------------------------------------------------- network


def test_decoder_prompts_from_text_give_the_text_logits(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = tiny.predict_logits(x, ["optic disc", "optic cup"]).logits
        keys = tiny.text_prompts(["optic disc", "optic cup"])
        out = tiny(x, keys)
    assert torch.allclose(ref, out.logits, atol=1e-4)
    with pytest.raises(InvalidPromptError, match="DecoderPrompts must have"):
        tiny(x, DecoderPrompts(keys.tokens, keys.keys[:, :3], keys.deep_keys))


def test_offsets_shift_the_logits_of_their_prompt_only(tiny):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        keys = tiny.text_prompts(["a", "b"])
        base = tiny(x, keys).logits
        shifted = tiny(x, DecoderPrompts(keys.tokens, keys.keys, keys.deep_keys, torch.tensor([2.0, 0.0]))).logits
    assert torch.allclose(shifted[:, 0], base[:, 0] + 2.0, atol=1e-4)
    assert torch.allclose(shifted[:, 1], base[:, 1], atol=1e-5)


def test_exemplar_prompt_shapes_and_the_masked_mean(tiny):
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(3, 64, 64)
    masks[0, 8:30, 8:30] = 1
    masks[1, 30:60, 20:50] = 1
    masks[2, 4:20, 40:60] = 1
    with torch.inference_mode():
        out = tiny.encode_exemplar_prompts(x, masks, ["disc", "cup", "disc"], image_index=[0, 0, 1], contrast=0.0)
        c, e = tiny.decoder.text_head.in_features, tiny.decoder.text_head.out_features
        for p in (out.visual, out.combined):
            assert p.tokens.shape == (3, c) and p.keys.shape == (3, e) and p.deep_keys.shape == (3, e)
            assert p.bias.shape == (3,) and torch.isfinite(p.bias).all()
        assert torch.allclose(out.visual.keys.norm(dim=-1), torch.ones(3), atol=1e-5)
        # contrast 0: the key is the unit mean of the unit pixel embeddings of the generic pass
        generic = tiny._batch_text(build_prompt_batch([tiny_generic()], 2), None, x.device)
        _, dec = tiny._run(x, generic, None, return_embeddings=True)
        emb = F.normalize(dec.pixel_embeddings.float(), dim=1)
        w = F.interpolate(masks[:, None], size=emb.shape[-2:], mode="area")[:, 0]
        manual = torch.stack([(emb[j] * w[i]).sum((1, 2)) for i, j in enumerate([0, 0, 1])])
        assert torch.allclose(out.visual.keys, F.normalize(manual, dim=-1), atol=1e-4)
    with pytest.raises(InvalidExemplarError, match="image_index"):
        tiny.encode_exemplar_prompts(x, masks, ["a", "b", "c"], image_index=[0, 0, 2])
    with pytest.raises(InvalidExemplarError, match="empty at the network"):
        tiny.encode_exemplar_prompts(x[:1], torch.zeros(1, 64, 64), ["a"])


def tiny_generic() -> str:
    from emclip.nn.emclip import GENERIC_PROMPT

    return GENERIC_PROMPT


def test_the_key_ignores_embeddings_outside_the_mask():
    emb = F.normalize(torch.randn(1, 8, 16, 16), dim=1)
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:10, 3:12] = 1
    valid = torch.ones_like(mask)
    key = _contrast_direction(emb, mask, valid, 0.0)
    changed = emb.clone()
    changed[:, :, mask[0] == 0] = F.normalize(torch.randn(8, int((mask[0] == 0).sum())), dim=0)
    assert torch.allclose(_contrast_direction(changed, mask, valid, 0.0), key, atol=1e-6)
    expected = F.normalize(emb[0][:, mask[0] > 0].mean(1), dim=0)
    assert torch.allclose(key[0], expected, atol=1e-6)
    # with contrast the outside matters (it is subtracted)
    assert not torch.allclose(_contrast_direction(changed, mask, valid, 1.0), _contrast_direction(emb, mask, valid, 1.0))


# ----------------------------------------------------------------------------- segment


def test_exemplar_only_finds_a_copy_of_its_structure():
    """The bundled model, never trained on this synthetic image: the exemplar alone (no text,
    a made-up name) finds the disc in the same image and in a shifted, re-noised one."""
    model = emclip.load_model(None, "cpu")
    img, disc = _blob_image(size=128)
    ex = Exemplar(img, disc, "zorblat")
    same = emclip.segment(img, None, model, exemplars=[ex])
    assert same.prompts == ["zorblat"]
    assert dice(same.masks[0], disc) > 0.85
    img2, disc2 = _blob_image(seed=5, size=128, shift=12)
    moved = emclip.segment(img2, [], model, exemplars=TemplateBank([ex]))
    assert dice(moved.masks[0], disc2) > 0.8


def test_prompt_planning_combine_only_and_extra_names(tiny):
    img, disc = _blob_image()
    ex = Exemplar(img, disc, "Blob")
    text = emclip.segment(img, "blob, other", tiny)
    combined = emclip.segment(img, "blob, other", tiny, exemplars=[ex])
    only = emclip.segment(img, "blob, other", tiny, exemplars=[ex], exemplar_mode="only")
    assert combined.prompts == only.prompts == ["blob", "other"]
    assert combined.info["exemplars"] == {"mode": "combine", "counts": {"Blob": 1}}
    assert not np.allclose(text.probabilities[0], combined.probabilities[0])
    assert not np.allclose(combined.probabilities[0], only.probabilities[0])
    extra = emclip.segment(img, "other", tiny, exemplars=[ex, Exemplar(img, ~disc, "ground")])
    assert extra.prompts == ["other", "Blob", "ground"]
    assert emclip.segment(img, "", tiny, exemplars=[ex]).prompts == ["Blob"]


def test_exemplar_features_are_cached_per_exemplar(monkeypatch):
    model = emclip.create_model("tiny").eval()
    calls = []
    original = model.encode_exemplar_prompts

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode_exemplar_prompts", counting)
    img, disc = _blob_image()
    ex = Exemplar(img, disc, "blob")
    first = emclip.segment(img, None, model, exemplars=[ex])
    second = emclip.segment(img, None, model, exemplars=[Exemplar(img, disc, "blob")])  # same content
    assert calls == [1] and np.array_equal(first.probabilities, second.probabilities)
    emclip.segment(img, None, model, exemplars=[ex, Exemplar(img, disc[::-1].copy(), "flipped")])
    assert calls == [1, 2]  # the new exemplar's image is encoded with both names: both recomputed
    with torch.no_grad():
        model.decoder.logit_bias.add_(1.0)  # changed weights invalidate the cache
    emclip.segment(img, None, model, exemplars=[ex])
    assert calls == [1, 2, 1]
    exemplar_prompts.clear_exemplar_cache(model)
    emclip.segment(img, None, model, exemplars=[ex])
    assert calls == [1, 2, 1, 1]


def test_segment_stack_with_exemplars(tiny):
    img, disc = _blob_image()
    volume = np.stack([img, img[::-1], img])
    ex = Exemplar(img, disc, "blob")
    res = emclip.segment_stack(volume, None, tiny, exemplars=[ex], axis=0)
    assert res.prompts == ["blob"] and res.masks.shape == (1, 3, 96, 96)
    single = emclip.segment(img, None, tiny, exemplars=[ex])
    # one intensity window for the volume vs per image: same image content, close probabilities
    assert np.abs(res.probabilities[0, 0] - single.probabilities[0]).mean() < 0.05


def test_cli_exemplar_and_bank(tmp_path, capsys):
    import tifffile
    from emclip.cli.main import main

    img, disc = _blob_image()
    image = (img * 200).clip(0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "ref.tif", image)
    tifffile.imwrite(tmp_path / "ref_mask.tif", disc.astype(np.uint8))
    tifffile.imwrite(tmp_path / "target.tif", image)
    rc = main(["segment", str(tmp_path / "target.tif"), "--exemplar", str(tmp_path / "ref.tif"),
               str(tmp_path / "ref_mask.tif"), "blob", "-o", str(tmp_path / "out"), "--model", "tiny", "-q"])
    assert rc == 0
    masks = emclip.io.read_mask_tiff(tmp_path / "out" / "target_masks.tif")
    assert list(masks.prompts) == ["blob"]
    TemplateBank([Exemplar(image, disc, "blob")]).save(tmp_path / "bank")
    rc = main(["segment", str(tmp_path / "target.tif"), "-p", "other", "--bank", str(tmp_path / "bank"),
               "-o", str(tmp_path / "out2"), "--model", "tiny", "-q", "--exemplar-mode", "only"])
    assert rc == 0
    assert list(emclip.io.read_mask_tiff(tmp_path / "out2" / "target_masks.tif").prompts) == ["other", "blob"]
    tifffile.imwrite(tmp_path / "blank.tif", np.zeros_like(image))
    capsys.readouterr()
    rc = main(["segment", str(tmp_path / "target.tif"), "--exemplar", str(tmp_path / "ref.tif"),
               str(tmp_path / "blank.tif"), "blob", "-o", str(tmp_path / "out3"), "--model", "tiny", "-q"])
    err = capsys.readouterr().err
    assert rc != 0 and "blank.tif" in err and "mask is empty" in err
    assert not (tmp_path / "out3").exists()  # refused before anything was written
