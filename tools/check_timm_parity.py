"""Checks the ViT port against timm itself (run where torch and timm are installed).

    python3 tools/check_timm_parity.py [--fixture_dir tests/fixtures]

1. Our ``timm_state_dict_keys`` for ViT-B/16 equal the keys of timm's ``vit_base_patch16_224``
   state dict, in order, with the same shapes.
2. A randomly initialised timm ViT-B/16 (40-way head) converted with ``from_timm_state_dict`` gives
   the same logits and class-token features as timm on the same images (float32, highest matmul
   precision, on the default JAX device).
3. With ``--fixture_dir``: the committed tiny fixture reproduces.
4. With ``--autocast`` (needs CUDA): the dtypes timm's ViT-B/16 produces under
   ``torch.autocast("cuda", torch.bfloat16)`` (patch embedding, the residual stream after the
   position embedding, norm1, attention, GELU, fc2, a block's output, the final norm, the
   logits), whether they are those ``vit.apply(dtype=bfloat16)`` follows (``models/vit.py``),
   and the largest differences of our bf16 forward (on the default JAX device) from timm's
   autocast one, beside the float32 ones for scale.
5. With ``--init``: the statistics of timm's random initialisation of ViT-B/16 (std, largest
   value, share beyond 0.04) per kind of tensor beside ours (``vit.init_params``).
Prints one JSON line.
"""

import argparse
import json
import os
import re

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


# What models/vit.py's bf16 path computes in, per point of timm's forward (autocast's rules).
AUTOCAST_EXPECTED = {"patch_embed": "bfloat16", "stream": "float32", "norm1": "float32",
                     "attn": "bfloat16", "gelu": "bfloat16", "fc2": "bfloat16",
                     "block": "float32", "final_norm": "float32", "logits": "bfloat16"}


def autocast_check(model, x):
    """timm's dtypes and outputs under bf16 autocast on CUDA, and ours in bf16 beside them."""
    seen = {}

    def out(name):
        def hook(module, args, output):  # returns None: the output is left as it is
            seen.setdefault(name, output.dtype)
        return hook

    def stream(module, args):
        seen.setdefault("stream", args[0].dtype)

    block = model.blocks[0]
    hooks = [model.patch_embed.register_forward_hook(out("patch_embed")),
             block.register_forward_pre_hook(stream),
             block.norm1.register_forward_hook(out("norm1")),
             block.attn.register_forward_hook(out("attn")),
             block.mlp.act.register_forward_hook(out("gelu")),
             block.mlp.fc2.register_forward_hook(out("fc2")),
             block.register_forward_hook(out("block")),
             model.norm.register_forward_hook(out("final_norm")),
             model.head.register_forward_hook(out("logits"))]
    cuda_model, xc = model.cuda(), x.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        tokens = cuda_model.forward_features(xc)
        logits = cuda_model.forward_head(tokens).float().cpu().numpy()
        cls = tokens[:, 0].float().cpu().numpy()
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        f32_logits = cuda_model.forward_head(cuda_model.forward_features(xc)).cpu().numpy()
    model.cpu()
    dtypes = {k: str(v).replace("torch.", "") for k, v in seen.items()}
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = vit.ViTConfig.preset("vit_base_patch16_224", num_classes=model.num_classes)
    params = vit.from_timm_state_dict(cfg, sd)
    images = jax.numpy.asarray(x.permute(0, 2, 3, 1).numpy())
    ours_logits, ours_cls = jax.jit(lambda p, i: vit.apply(cfg, p, i, dtype=jax.numpy.bfloat16))(
        params, images)
    f32_ours = np.asarray(jax.jit(lambda p, i: vit.apply(cfg, p, i))(params, images)[0])
    ours_logits, ours_cls = np.asarray(ours_logits), np.asarray(ours_cls)
    return {"autocast_dtypes": dtypes, "autocast_dtypes_as_ours": dtypes == AUTOCAST_EXPECTED,
            "autocast_max_abs_err_logits": float(np.abs(ours_logits - logits).max()),
            "autocast_max_abs_err_cls": float(np.abs(ours_cls - cls).max()),
            "autocast_logits_bf16_representable": bool(np.array_equal(
                ours_logits, ours_logits.astype(jax.numpy.bfloat16).astype(np.float32))),
            "f32_max_abs_err_logits": float(np.abs(f32_ours - f32_logits).max()),
            "bf16_vs_f32_timm_max_abs_logits": float(np.abs(logits - f32_logits).max()),
            "max_abs_logits": float(np.abs(f32_logits).max())}


def _stats(values: np.ndarray) -> dict:
    values = np.asarray(values, np.float64).ravel()
    return {"std": float(values.std()), "max_abs": float(np.abs(values).max()),
            "beyond_0.04": float(np.mean(np.abs(values) > 0.04)), "n": int(values.size)}


def init_check(sd: dict) -> dict:
    """Per kind of tensor, timm's random init (``sd``) beside ours (``vit.init_params``)."""
    cfg = vit.ViTConfig.preset("vit_base_patch16_224", num_classes=40)
    ours = vit.to_timm_state_dict(vit.init_params(cfg, jax.random.key(0)))
    kinds = {"linear_weight": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc\d)\.weight",
             "head_weight": r"head\.weight", "pos_embed": r"pos_embed", "cls_token": r"cls_token",
             "patch_weight": r"patch_embed\.proj\.weight",
             "patch_bias": r"patch_embed\.proj\.bias", "linear_bias": r"blocks.*(qkv|fc\d)\.bias"}
    out = {}
    for kind, pattern in kinds.items():
        keys = [k for k in sd if re.fullmatch(pattern, k)]
        out[kind] = {"timm": _stats(np.concatenate([np.ravel(sd[k]) for k in keys])),
                     "ours": _stats(np.concatenate([np.ravel(ours[k]) for k in keys]))}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixture_dir", default=None)
    parser.add_argument("--autocast", action="store_true")
    parser.add_argument("--init", action="store_true")
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
    if args.init:
        result["init"] = init_check(sd)
    if args.autocast:
        if not torch.cuda.is_available():
            result["autocast"] = "skipped: torch sees no CUDA device"
        else:
            torch.manual_seed(1)
            with torch.no_grad():  # a trained model's scale: larger than the init's
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
            result.update(autocast_check(model, x))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
