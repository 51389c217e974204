r"""The default study on the embedded SynthFaces data (CPU-sized).

SynthFaces is procedurally generated (nothing is downloaded): 600 identities (the ``medium``
variant) with 2-30 images each and a CelebA-like multi-label attribute task, some attributes
following the identity, some the image and some an identity-specific annotator quirk that only
memorisation can fit (so a model trained on a person fits them better than one that never saw
the person).

The study pretrains a small ViT from scratch, retrains it without the forget identities (the
oracle), meta-trains MetaUnlearn and unlearns the request from its support images, selects
support_ascent's step length and takes its step, runs the reference's one-shot baselines (SSD,
Lipschitz / JiT, PGU) and its full-data baselines (SCRUB, Bad Teacher), attacks every model
(the reference's loss attack; RMIA with a reference model the study builds for each method; the
attack on people), then reports retain / forget / test mAP, ToW, the attacks' AUC and TPR and
each method's data access for each: 9 min 37 s on 2 CPU cores before MetaUnlearn's held-out
diagnostics, which lengthen its stage from 47 s to 118-173 s (README "MetaUnlearn: results").

Run it (from the repository root)::

    python -m oneshui_jax.main --config=configs/synthfaces.py
    python -m oneshui_jax.main --config=configs/synthfaces.py:N=50 --config.seed=1
    python -m oneshui_jax.main --config=configs/synthfaces.py:runlocal=True  # seconds

``get_config(arg)`` takes ``key=value`` pairs separated by commas: ``N`` (forget identities,
default 10), ``size`` (the SynthFaces variant: ``medium``, the default, 600 identities;
``large``, 1,200; ``small``, 150 at 32 px), ``runlocal`` (``True``: the smoke test, below) and
``ensemble`` (K >= 3: K members of pretrain and of retrain for the per-person test, e.g.
``configs/synthfaces.py:ensemble=8``).

The config is ``config_lib.base_config`` (the paper's setting) with what this CPU demo changes:
its data, a small ViT from scratch with AdamW, float32, MetaUnlearn's selected step, every
attack. ``runlocal=True`` shrinks it to seconds (``size=small`` and ``N=5`` unless given; one
epoch; MetaUnlearn and support_ascent on a few simulated requests; no attack, no progress bars;
``config_lib.RUNLOCAL`` and ``RUNLOCAL`` below): the shared small study of the tests
(``tests/small_study.py``) starts from it.
"""

import ml_collections

from oneshui_jax import config_lib, hparams
from oneshui_jax.data import synthfaces

# MetaUnlearn's candidates for python -m oneshui_jax.select: the reference's algorithm with a
# few step sizes (the first three), then the named step-length options (unlearn/meta_unlearn/).
SELECTION_CANDIDATES = (
    "",
    "meta_lr=1e-3",
    "lr=1e-4,meta_lr=0.1",
    "step_control=line_search",
    "step_control=normalize,relative_step=1e-3",
    "step_control=normalize,relative_step=1e-2",
    "step_control=normalize,relative_step=1e-3,task_ascent=1",
    "step_control=normalize,relative_step=1e-3,task_ascent=100",
    "step_control=normalize,relative_step=1e-3,requests_per_update=4",
)

# runlocal=True: on top of config_lib.RUNLOCAL (one epoch, one meta-epoch, no attack, ...), the
# two servable methods of this repository, each on few requests (dotted path -> value).
RUNLOCAL = {
    "stages": ("pretrain", "retrain", "meta_unlearn", "support_ascent"),
    "meta_unlearn.num_identities_simulation": 30,  # size=small, N=5: 3 simulated requests
    "meta_unlearn.batch_size": 256,  # one outer batch per request: one compilation
    "support_ascent.batch_size": 256,
    "support_ascent.num_requests": 4,  # simulated requests choosing the step length
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(
        arg, {"N": 10, "size": synthfaces.DEFAULT_CONFIG, "runlocal": False, "ensemble": 0},
        choices={"size": tuple(synthfaces.CONFIGS)}, runlocal_defaults={"N": 5, "size": "small"})
    # Every row of the paper's table, in its order (config_lib.ALL).
    config = config_lib.base_config("synthfaces", args["N"])

    config.data.synthfaces_config = args["size"]  # medium | large | small
    # ensemble=K: K members of pretrain and of retrain for the per-person test (mia/ulira.py)
    config.ensemble.size = args["ensemble"]
    config.data.data_dir = ""  # unused for SynthFaces (generated, nothing read)
    config.data.image_size = 32  # model input; SynthFaces images are 48 px (32 for "small")
    # RandomResizedCrop area range. The reference's (0.08, 1.0) leaves too little of a 48 px
    # face to learn from; SynthFaces uses a milder crop (a deviation of this config only).
    config.data.crop_scale = (0.35, 1.0)
    config.data.num_threads = 2  # grain read threads
    # Decode the images once and keep them in memory (31 MB; large: 61 MB): bit-identical
    # results, and the two CPU cores spend the epochs on training instead of PNG decoding.
    config.data.in_memory = True
    # Evaluation batch: 256, faster on CPU. The reference evaluates at 32, and a split's loss is
    # the mean of its batch means (SPEC 5.1), so the reported losses differ a little from those
    # at 32 (most on the small forget set); metrics and per-image losses do not.
    config.data.eval_batch_size = 256

    config.model.name = "vit_small_demo"  # a ViT preset of oneshui_jax.models.vit
    config.model.init = ""  # train from scratch
    # Fresh weights (vit.INIT_SCHEMES): "lecun" (normals truncated at 2 std, a LeCun-normal
    # patch convolution), as every SynthFaces result was measured; "timm" draws timm's.
    config.model.init_scheme = "lecun"

    # Pretrain / retrain: the reference's schedule (linear warmup, then per-epoch cosine). The
    # reference fine-tunes ImageNet ViT-B/16 weights with SGD; a tiny ViT trained from scratch
    # learns far too slowly with SGD in a CPU budget, so this config uses AdamW (a deviation of
    # the SynthFaces demo only; real-data configs keep SGD). bf16 matmuls are slow on CPU.
    config.train.update(optimizer="adamw", epochs=20, batch_size=64, lr=1e-3, weight_decay=1e-4,
                        warmup_epochs=2, compute_dtype="float32")

    # Every method block lists all of the method's settings: its Config's defaults (the
    # reference's parser defaults, config_lib.base_config), then what this config changes.
    #
    # MetaUnlearn (SPEC.md 6.6: the reference's CelebA values, except what the selection chose).
    # The reference's lr 1e-4 / meta_lr 0.1 (for fine-tuned ViT-B/16) wreck this tiny model.
    # python -m oneshui_jax.select on seed 0 (held-out simulated requests of training identities
    # outside the request; bench/results/selection_synthfaces) chose, of nine candidates, the
    # normalised step (||Δθ|| = 1e-3 ||θ||, times the line search's factor) with a task-ascent
    # term λ = 100, and, within the reference's algorithm, meta_lr 1e-3: the variant below.
    ml = config.meta_unlearn
    ml.epochs = 3
    ml.lr = 1e-3  # AdamW(AMSGrad) of the meta-loss
    ml.meta_lr = 1e-3  # step size of the inner step (unused with step_control="normalize")
    ml.compute_dtype = "float32"  # outer passes (the reference: bfloat16 on GPUs)
    config_lib.meta_unlearn_blocks(
        config, best=dict(step_control="normalize", relative_step=1e-3, task_ascent=100.0),
        reference={})  # config.meta_unlearn_reference: the reference's algorithm, meta_lr 1e-3

    # Hyper-parameter selection without the request (python -m oneshui_jax.select): each
    # candidate overrides config.meta_unlearn and is scored on held-out simulated requests of
    # TRAIN identities outside the request (README "MetaUnlearn: choosing its settings").
    config.selection.meta_unlearn = SELECTION_CANDIDATES

    # support_ascent: one ascent step on the portraits' task loss, its length chosen on
    # simulated requests of held-out training identities (unlearn/support_ascent.py).
    config.support_ascent.compute_dtype = "float32"

    # The reference's one-shot baselines (SPEC.md 7.3-7.5) with its generic values (the
    # reference never tuned them for this data; nothing here was tuned either): their Config's
    # defaults. SSD: dampening from training importances (stats); Lipschitz / JiT: smooth the
    # output (support); PGU: projected gradient unlearning (stats).
    config.pgu.compute_dtype = "float32"  # bf16 matmuls are slow on CPU

    # The reference's full-data baselines (SPEC.md 7.1-7.2), ACCESS full: SynthFaces is
    # CelebA-like, so the reference's CelebA values for N, epochs included (SCRUB: 10 epochs,
    # max-steps in the first 5, lr 5e-3, no augmentation; Bad Teacher: 5 epochs, lr 1e-4, batch
    # 32; Q24's fallback and warning for an N it never configured).
    for name in config_lib.FULL_DATA_BASELINES:
        values, h = config_lib.reference_settings(name, "celeba", config.num_identities)
        config[name].update(values)
        hparams.warn_if_untuned(h)
        config[name].compute_dtype = "float32"

    # The privacy evaluation (SPEC.md 5.4-5.5), all of it in the default study: the reference's
    # loss attack with every evaluation, and RMIA with a reference model per method (the method
    # applied to the retrained model with the next seed; study/privacy.py) followed by the attack
    # on people.
    config.mia.rmia = True
    config.mia.batch_size = 256  # the reference: 32; the same losses, faster on CPU

    if args["runlocal"]:
        config_lib.runlocal(config, RUNLOCAL)
    return config
