"""Writes the timm parity fixture used by ``tests/test_timm_parity.py``.

Run where torch and timm are installed (e.g. the GPU machine; it computes on the CPU in float32)::

    python3 tools/make_timm_fixture.py --out tests/fixtures

It builds a tiny timm ``VisionTransformer`` with the architecture of ``vit_base_patch16_224``
(class token, pre-norm blocks, fused qkv with bias, exact GELU, LayerNorm eps 1e-6, token pooling)
at small sizes, perturbs every parameter so that no bias is zero, and saves:

* ``timm_tiny_vit.safetensors``: its state dict, as timm / Hugging Face files are stored;
* ``timm_tiny_vit.npz``: the same state dict (``sd/<key>``), random inputs (NHWC, in [-1, 1]),
  timm's logits and class-token features, the config and the library versions.
"""

import argparse
import json
import os

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

CONFIG = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
              num_classes=5)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tests/fixtures")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = VisionTransformer(**CONFIG, qkv_bias=True, class_token=True, global_pool="token")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    images = torch.rand(4, 3, CONFIG["img_size"], CONFIG["img_size"]) * 2 - 1
    with torch.no_grad():
        tokens = model.forward_features(images)
        logits = model.forward_head(tokens)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, "timm_tiny_vit.safetensors"))
    arrays = {f"sd/{k}": v.numpy() for k, v in state.items()}
    np.savez(os.path.join(args.out, "timm_tiny_vit.npz"),
             images_nhwc=images.permute(0, 2, 3, 1).numpy(), logits=logits.numpy(),
             cls_features=tokens[:, 0].numpy(),
             meta=np.array(json.dumps({"config": CONFIG, "timm": timm.__version__,
                                       "torch": torch.__version__})),
             **arrays)
    print(f"wrote {len(state)} tensors, timm {timm.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
