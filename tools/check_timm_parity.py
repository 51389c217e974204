"""Checks the ViT port against timm itself (run where torch and timm are installed).

    python3 tools/check_timm_parity.py [--fixture_dir tests/fixtures]

1. Our ``timm_state_dict_keys`` for ViT-B/16 equal the keys of timm's ``vit_base_patch16_224``
   state dict, in order, with the same shapes.
2. A randomly initialised timm ViT-B/16 (40-way head) converted with ``from_timm_state_dict`` gives
   the same logits and class-token features as timm on the same images (float32, highest matmul
   precision, on the default JAX device).
3. With ``--fixture_dir``: the committed tiny fixture reproduces.
Prints one JSON line.
"""

import argparse
import json
import os

import jax
import numpy as np
import timm
import torch

from oneshui_jax.models import vit


def compare(cfg, state_dict, images_nhwc, logits, cls):
    params = vit.from_timm_state_dict(cfg, state_dict)
    with jax.default_matmul_precision("highest"):
        ours_logits, ours_cls = vit.apply(cfg, params, images_nhwc)
    return (float(np.abs(np.asarray(ours_logits) - logits).max()),
            float(np.abs(np.asarray(ours_cls) - cls).max()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixture_dir", default=None)
    args = parser.parse_args()
    result = {"timm": timm.__version__, "torch": torch.__version__, "jax": jax.__version__,
              "device": str(jax.devices()[0].device_kind)}
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=40).eval()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = vit.ViTConfig.preset("vit_base_patch16_224", num_classes=40)
    ours = vit.timm_state_dict_keys(cfg)
    result["keys_equal_in_order"] = ours == list(sd)
    params = vit.from_timm_state_dict(cfg, sd)
    back = vit.to_timm_state_dict(params)
    result["shapes_equal"] = all(back[k].shape == sd[k].shape for k in sd)
    result["num_tensors"] = len(sd)
    result["num_params"] = int(sum(v.size for v in sd.values()))
    x = torch.rand(4, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens).numpy()
    err_logits, err_cls = compare(cfg, sd, x.permute(0, 2, 3, 1).numpy(), logits,
                                  tokens[:, 0].numpy())
    result["vit_b16_max_abs_err_logits"] = err_logits
    result["vit_b16_max_abs_err_cls"] = err_cls
    if args.fixture_dir:
        data = np.load(os.path.join(args.fixture_dir, "timm_tiny_vit.npz"))
        meta = json.loads(str(data["meta"]))["config"]
        tiny = vit.ViTConfig(image_size=meta["img_size"], patch_size=meta["patch_size"],
                             width=meta["embed_dim"], depth=meta["depth"],
                             num_heads=meta["num_heads"], mlp_ratio=meta["mlp_ratio"],
                             num_classes=meta["num_classes"])
        sd_tiny = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
        result["tiny_max_abs_err_logits"], result["tiny_max_abs_err_cls"] = compare(
            tiny, sd_tiny, data["images_nhwc"], data["logits"], data["cls_features"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
