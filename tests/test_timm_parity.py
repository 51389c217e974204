"""The ViT port reproduces timm itself (fixture made by tools/make_timm_fixture.py with timm).

The fixture is a tiny timm ``VisionTransformer`` with ViT-B/16's architecture, every parameter
perturbed, its state dict, inputs, logits and class-token features, produced once with timm 1.0.29
and torch 2.11 (see the ``meta`` entry). ``tools/check_timm_parity.py`` runs the same comparison
for a full ViT-B/16 where timm is installed (measured on an H100: max |logit error| 3.3e-6).
"""

import json
import os

import numpy as np

from oneshui_jax.models import vit

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "timm_tiny_vit.npz")


def _load():
    data = np.load(FIXTURE)
    meta = json.loads(str(data["meta"]))
    c = meta["config"]
    cfg = vit.ViTConfig(image_size=c["img_size"], patch_size=c["patch_size"], width=c["embed_dim"],
                        depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
                        num_classes=c["num_classes"])
    state_dict = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    return cfg, state_dict, data, meta


def test_fixture_keys_are_ours_in_timm_order():
    cfg, state_dict, _, meta = _load()
    assert meta["timm"]  # made by timm, not by us
    assert list(state_dict) == vit.timm_state_dict_keys(cfg)


def test_port_reproduces_timm_logits_and_features():
    cfg, state_dict, data, _ = _load()
    params = vit.from_timm_state_dict(cfg, state_dict)
    logits, cls = vit.apply(cfg, params, data["images_nhwc"])
    np.testing.assert_allclose(np.asarray(logits), data["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cls), data["cls_features"], atol=1e-5, rtol=0)


def test_round_trip_returns_timm_layout():
    cfg, state_dict, _, _ = _load()
    back = vit.to_timm_state_dict(vit.from_timm_state_dict(cfg, state_dict))
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
