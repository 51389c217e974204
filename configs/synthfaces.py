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

``get_config(arg)`` takes ``key=value`` pairs separated by commas: ``N`` (forget identities,
default 10) and ``size`` (the SynthFaces variant: ``medium``, the default, 600 identities;
``large``, 1,200; ``small``, 150 at 32 px).
"""

import ml_collections
from ml_collections import config_dict

from oneshui_jax import config_lib, hparams
from oneshui_jax.data import synthfaces
from oneshui_jax.unlearn import api, registry

# MetaUnlearn's candidates for python -m oneshui_jax.select: the reference's algorithm with a
# few step sizes (the first three), then the named step-length options (unlearn/meta_unlearn.py).
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, {"N": 10, "size": synthfaces.DEFAULT_CONFIG},
                                choices={"size": tuple(synthfaces.CONFIGS)})
    config = ml_collections.ConfigDict()
    config.dataset = "synthfaces"
    config.num_identities = args["N"]  # N_S: identities in the deletion request
    config.seed = 0
    # The split's seed when it must differ from config.seed (RMIA's reference models: the same
    # split, other randomness); None: config.seed. Part of the run folder's name when it differs.
    config.split_seed = config_dict.placeholder(int)
    config.workdir = "workdir/synthfaces"  # results, tables, plots
    config.checkpoint_dir = "checkpoints"  # <dir>/<dataset>/<model>/<stage>_<N>_<seed>/
    # A killed stage resumes from its last save; saves at most every this many seconds (at epoch
    # or request boundaries; 0: every one). Changes no result.
    config.checkpoint_every_s = 60.0
    # A stage another process is running (same checkpoint_dir): wait for it and reuse its
    # result (True), or stop at once naming its pid and host (False).
    config.wait_for_lock = True
    config.stages = ("pretrain", "retrain", *config_lib.ONE_SHOT,
                     *config_lib.FULL_DATA_BASELINES)  # in this order

    config.data = ml_collections.ConfigDict()
    config.data.synthfaces_config = args["size"]  # medium | large | small
    config.data.data_dir = ""  # unused for SynthFaces (generated, nothing read)
    config.data.tfds_dir = "~/tensorflow_datasets"  # where the built records live
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
    # "none" | "merge": merge identities that share byte-identical images (a documented deviation
    # for real data; SynthFaces has none).
    config.data.dedup = "none"

    config.model = ml_collections.ConfigDict()
    config.model.name = "vit_small_demo"  # a ViT preset of oneshui_jax.models.vit
    # Initial weights: a timm .safetensors, a Google ViT .npz or a converted run directory
    # (oneshui_jax.models.pretrained). Empty: train from scratch, as SynthFaces does.
    config.model.init = ""
    # Fresh weights (vit.INIT_SCHEMES): "lecun" (normals truncated at 2 std, a LeCun-normal
    # patch convolution), as every SynthFaces result was measured; "timm" draws timm's.
    config.model.init_scheme = "lecun"

    # Pretrain / retrain: the reference's schedule (linear warmup, then per-epoch cosine). The
    # reference fine-tunes ImageNet ViT-B/16 weights with SGD; a tiny ViT trained from scratch
    # learns far too slowly with SGD in a CPU budget, so this config uses AdamW (a deviation of
    # the SynthFaces demo only; real-data configs keep SGD).
    config.train = ml_collections.ConfigDict()
    config.train.optimizer = "adamw"  # sgd | adamw
    config.train.epochs = 20
    config.train.batch_size = 64
    config.train.lr = 1e-3
    config.train.weight_decay = 1e-4
    config.train.momentum = 0.9  # SGD only
    config.train.warmup_epochs = 2
    config.train.compute_dtype = "float32"  # bf16 matmuls are slow on CPU
    config.train.attention = "xla"  # "cudnn" on GPUs: fused attention, 1.31x faster (ViT-B/16)
    # mAP scores: "reference" rounds sigmoid to bf16 under bf16 compute (SPEC Q4); in float32
    # both choices give the same scores.
    config.train.ap_scores = "reference"
    config.train.remat = False  # jax.checkpoint per block: less memory, more compute, same numbers

    # Every method block lists all of the method's settings: its Config's defaults (the
    # reference's parser defaults), then what this config changes.
    #
    # MetaUnlearn (SPEC.md 6.6: the reference's CelebA values, except what the selection chose).
    # The reference's lr 1e-4 / meta_lr 0.1 (for fine-tuned ViT-B/16) wreck this tiny model.
    # python -m oneshui_jax.select on seed 0 (held-out simulated requests of training identities
    # outside the request; bench/results/selection_synthfaces) chose, of nine candidates, the
    # normalised step (||Δθ|| = 1e-3 ||θ||, times the line search's factor) with a task-ascent
    # term λ = 100, and, within the reference's algorithm, meta_lr 1e-3: the variant below.
    config.meta_unlearn = ml = api.default_block(registry.METHODS["meta_unlearn"])
    ml.epochs = 3
    ml.lr = 1e-3  # AdamW(AMSGrad) of the meta-loss
    ml.meta_lr = 1e-3  # step size of the inner step (unused with step_control="normalize")
    ml.num_identities_simulation = config.num_identities  # identities per simulated request
    ml.compute_dtype = "float32"  # outer passes (the reference: bfloat16 on GPUs)
    config_lib.meta_unlearn_blocks(
        config, best=dict(step_control="normalize", relative_step=1e-3, task_ascent=100.0),
        reference={})  # config.meta_unlearn_reference: the reference's algorithm, meta_lr 1e-3

    # Hyper-parameter selection without the request (python -m oneshui_jax.select): each
    # candidate overrides config.meta_unlearn and is scored on held-out simulated requests of
    # TRAIN identities outside the request (README "MetaUnlearn: choosing its settings").
    config.selection = ml_collections.ConfigDict()
    config.selection.meta_unlearn = SELECTION_CANDIDATES

    # support_ascent: one ascent step on the portraits' task loss, its length chosen on
    # simulated requests of held-out training identities (unlearn/support_ascent.py).
    config.support_ascent = sa = api.default_block(registry.METHODS["support_ascent"])
    sa.num_identities_simulation = config.num_identities
    sa.compute_dtype = "float32"

    # The reference's one-shot baselines (SPEC.md 7.3-7.5) with its generic values (the
    # reference never tuned them for this data; nothing here was tuned either).
    # SSD: dampening from training importances (stats); Lipschitz / JiT: smooth the output
    # (support); PGU: projected gradient unlearning (stats).
    for name in config_lib.ONE_SHOT_BASELINES:
        config[name] = api.default_block(registry.METHODS[name])
    config.pgu.compute_dtype = "float32"  # bf16 matmuls are slow on CPU

    # The reference's full-data baselines (SPEC.md 7.1-7.2), ACCESS full: SynthFaces is
    # CelebA-like, so the reference's CelebA values for N, epochs included (SCRUB: 10 epochs,
    # max-steps in the first 5, lr 5e-3, no augmentation; Bad Teacher: 5 epochs, lr 1e-4, batch
    # 32; Q24's fallback and warning for an N it never configured).
    for name in config_lib.FULL_DATA_BASELINES:
        config[name], h = api.reference_block(registry.METHODS[name], name, "celeba",
                                              config.num_identities)
        hparams.warn_if_untuned(h)
        config[name].compute_dtype = "float32"

    # The privacy evaluation (SPEC.md 5.4-5.5), all of it in the default study: the reference's
    # loss attack with every evaluation, and RMIA with a reference model per method (the method
    # applied to the retrained model with the next seed; study/privacy.py) followed by the attack
    # on people.
    config.mia = config_lib.mia_block(config.dataset)
    config.mia.rmia = True
    config.mia.batch_size = 256  # the reference: 32; the same losses, faster on CPU

    # Data parallelism (oneshui_jax/sharding.py): the devices the batch is split over; -1 all
    # of them, 1 one device. The global batch stays config.train.batch_size.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1

    config.progress = True
    # Per-step and per-epoch training curves as TensorBoard event files in
    # <workdir>/tensorboard/<dataset>/<model>/<stage>_<N>_<seed>/ (needs tensorboardX:
    # pip install -e .[tensorboard]); metrics.jsonl has them either way. Changes no result.
    config.tensorboard = True
    return config
