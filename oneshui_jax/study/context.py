"""What the stages of a study share: the config, the dataset, the split, the model, evaluation.

``prepare(config)`` validates the config (``study.validate``), opens the dataset, makes the
reference-exact split (SPEC.md 2) and returns a :class:`Context`, which carries what every stage
shares: the settings ``validate_config`` resolved (``config.train`` and each method's ``Config``,
resolved once per study), the evaluation step (built once) and the study's :class:`Status` (where
it is, for the line an interrupt prints). ``evaluate_splits`` is the
reference's evaluation of a model on retain / forget / test / val (SPEC.md 5.2, eval transform).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from absl import logging

from oneshui_jax import checkpoints, files, metrics, sharding
from oneshui_jax import splits as splits_lib
from oneshui_jax import train as train_lib
from oneshui_jax.data import audit as audit_lib
from oneshui_jax.data import datasets as datasets_lib
from oneshui_jax.data import pipeline
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import vit
from oneshui_jax.study import validate
from oneshui_jax.unlearn import api


@dataclasses.dataclass
class Status:
    """Where a running study is (``where``, as the one line an interrupt or a failure prints:
    "in stage retrain", "in the privacy attacks, after the stages", ...). ``study.run`` updates
    it; ``main`` reads it."""

    where: str = "while reading the data and making the split, before the first stage"


@dataclasses.dataclass
class Context:
    """Everything the stages share: config, data, split and image indices, model config."""

    config: Any
    dataset: datasets_lib.Dataset
    splits: splits_lib.Splits
    images: dict[str, Any]
    model_cfg: vit.ViTConfig
    data_audit: dict[str, Any] | None = None  # real datasets: data.audit summary of this split
    settings: validate.Settings | None = None  # resolved once by validate_config (prepare)
    status: Status = dataclasses.field(default_factory=Status)

    def run_dir(self, stage: str) -> str:
        c = self.config
        return checkpoints.run_dir(os.path.expanduser(c.checkpoint_dir), dataset_folder(c),
                                   c.model.name, stage, c.num_identities, c.seed,
                                   split_seed(c))

    def pipeline_config(self, batch_size: int, **kw) -> pipeline.PipelineConfig:
        return pipeline.PipelineConfig(image_size=self.config.data.image_size,
                                       batch_size=batch_size, seed=self.config.seed,
                                       num_threads=self.config.data.num_threads, **kw)

    def process_pipeline_config(self, batch_size: int, **kw) -> pipeline.PipelineConfig:
        """``pipeline_config`` whose batches hold only this process's rows on a multi-host
        run (``sharding``): for the loops that place them with ``process_rows``."""
        return self.pipeline_config(batch_size, shard_by_process=jax.process_count() > 1, **kw)

    @property
    def model(self) -> api.Model:
        """The task model as methods see it (architecture, task, numerics)."""
        t = self.config.train
        return api.Model(self.model_cfg, self.dataset.task, t.compute_dtype, t.attention)

    @property
    def train_config(self) -> train_lib.TrainConfig:
        """``config.train`` as validated (``validate.train_config``)."""
        if self.settings is None:
            return validate.train_config(self.config, self.dataset.task)
        return self.settings.train

    def method_config(self, name: str) -> Any:
        """Method ``name``'s validated ``Config`` from ``config.<name>``: the one
        ``validate_config`` resolved for a stage of the study, else resolved now (e.g. a method
        the study does not run, for ``select``)."""
        if self.settings is not None and name in self.settings.methods:
            return self.settings.methods[name]
        return validate.method_config(self.config, name, self.dataset.task)

    @property
    def eval_step(self):
        """The evaluation step of the study's model and numerics (``train.make_eval_step``,
        built once)."""
        t = self.config.train
        return train_lib.make_eval_step(self.model_cfg, self.dataset.task, t.compute_dtype,
                                        t.attention)


def dataset_folder(config) -> str:
    """The dataset's folder under ``config.checkpoint_dir``: its name, and for a SynthFaces
    variant other than the default one ``synthfaces_<variant>`` (``synthfaces_large``,
    ``synthfaces_small``), so that runs on different data never share a folder."""
    from oneshui_jax.data import synthfaces

    variant = config.data.get("synthfaces_config", synthfaces.DEFAULT_CONFIG)
    if config.dataset == "synthfaces" and variant != synthfaces.DEFAULT_CONFIG:
        return f"synthfaces_{variant}"
    return config.dataset


def mesh_data(config) -> int:
    """``config.mesh.data``: -1 (every device, also when the config has no ``mesh`` block)."""
    return int((config.get("mesh") or {}).get("data", -1))


def split_seed(config) -> int:
    """The seed of the identity split: ``config.split_seed``, or ``config.seed`` when it is
    unset (None). The rest of the run's randomness (initialisation, data order, a method's
    draws) always follows ``config.seed``."""
    value = config.get("split_seed")
    return config.seed if value is None else value


def seeded_context(ctx: Context, seed: int) -> Context:
    """``ctx`` with every draw but the split's from ``seed``: the same data and split
    (``config.split_seed`` keeps it), another initial head, data order and augmentation."""
    config = ctx.config.copy_and_resolve_references()
    config.split_seed = split_seed(ctx.config)
    config.seed = seed
    return dataclasses.replace(ctx, config=config)


def model_config(config, num_classes: int) -> vit.ViTConfig:
    return vit.ViTConfig.preset(config.model.name, num_classes=num_classes,
                                image_size=config.data.image_size)


def evaluate_splits(ctx: Context, params) -> dict[str, dict[str, Any]]:
    """Loss and metric on retain / forget / test / val, eval transform (SPEC.md 5.2), and, with
    ``config.mia.loss_rf``, the reference's loss attack on the per-sample losses (SPEC.md 5.4):
    ``{"mia": {"loss_rf": {"auc", "acc", "n_estimators", "criterion", "roc"}}}``, in %."""
    eval_step = ctx.eval_step
    cfg = ctx.process_pipeline_config(ctx.config.data.eval_batch_size)
    score_dtype = ctx.train_config.score_dtype
    out: dict[str, Any] = {}
    losses = {}
    for split in metrics.EVAL_SPLITS:
        batches = pipeline.eval_batches(ctx.dataset.source, ctx.images[split], cfg)
        result = train_lib.evaluate(
            eval_step, params, batches, ctx.dataset.task,
            desc=f"eval {split}" if ctx.config.progress else None,
            total=pipeline.steps_per_epoch(len(ctx.images[split]), cfg.batch_size),
            process_rows=cfg.shard_by_process,
            score_dtype=score_dtype)
        out[split] = {"metric": result["metric"], "loss": result["loss"]}
        losses[split] = result["losses"]
    if wants_loss_attack(ctx.config):
        out["mia"] = {"loss_rf": loss_attack(losses)}
    return out


def wants_loss_attack(config) -> bool:
    """``config.mia.loss_rf`` (absent: False)."""
    return bool((config.get("mia") or {}).get("loss_rf", False))


def loss_attack(losses: dict[str, Any]) -> dict[str, Any]:
    """The reference's loss attack (``oneshui_jax.mia.loss_attack``) on per-sample losses of
    every split, as stored in a record: the chosen configuration, its AUC and accuracy (%) and
    its ROC curve at the FPRs of ``mia.roc.GRID``."""
    from oneshui_jax.mia import loss_attack as attack_lib
    from oneshui_jax.mia import roc

    result = attack_lib.attack(losses["retain"], losses["val"], losses["forget"], losses["test"])
    entry = {k: result[k] for k in ("auc", "acc", "n_estimators", "criterion")}
    if result["fpr"] is not None:
        entry["roc"] = roc.compact(result["fpr"], result["tpr"])
    return entry


def check_outputs(config) -> None:
    """A ConfigError unless the study can write its checkpoints and its results: refused before
    any data is read or any stage trains (not after a whole stage, when the report is written)."""
    outputs = {"checkpoint_dir": "the stages' checkpoints",
               "workdir": "results.{json,md,csv} and the plots"}
    for field, what in outputs.items():
        path = config.get(field)
        if not path:
            raise ConfigError(f"--config.{field} is empty; expected a folder for {what}")
        problem = files.cannot_write_in(os.path.expanduser(path))
        if problem:
            raise ConfigError(f"--config.{field} {path} cannot be written: {problem}; expected a "
                              f"writable folder for {what}")


def prepare(config, status: Status | None = None) -> Context:
    """Validates the config, checks the output folders, opens the dataset and makes the
    reference-exact split; ``status`` (default: a new one) is the context's :class:`Status`."""
    settings = validate.validate_config(config)
    check_outputs(config)
    sharding.setup(mesh_data(config))
    sharding.check_batch_size(config.train.batch_size, "config.train.batch_size")
    if jax.process_count() > 1:
        sharding.check_batch_size(config.data.eval_batch_size, "config.data.eval_batch_size")
    ds = datasets_lib.load(config.dataset, config.data, progress=config.progress)
    if ds.merged_identities:
        logging.warning("config.data.dedup=merge: %d identities merged into others because they "
                        "share byte-identical images (a deviation from the reference)",
                        ds.merged_identities)
    splits = splits_lib.make_splits(ds.annotations, config.num_identities, split_seed(config))
    images = splits_lib.split_images(ds.annotations, splits)
    logging.info("splits: identities train/val/test %d/%d/%d, forget %d (%d images)",
                 len(splits.train), len(splits.val), len(splits.test), len(splits.forget),
                 len(images["forget"]))
    data_audit = None
    if ds.audit is not None:
        roles = {r: images[r] for r in ("forget", "support", "retain", "val", "test")}
        data_audit = {**ds.audit.summary(roles), "dedup": config.data.get("dedup", "none"),
                      "merged_identities": ds.merged_identities}
        for line in audit_lib.format_summary(data_audit, data_audit["dedup"]).splitlines():
            logging.info("%s", line)
    return Context(config, ds, splits, images, model_config(config, ds.num_classes), data_audit,
                   settings, status or Status())


def initial_params(ctx: Context):
    """Where pretrain and retrain start: ``config.model.init`` (ImageNet weights, as the reference
    does) or, when it is empty, a fresh initialisation from the seed drawn by
    ``config.model.init_scheme`` (SynthFaces; ``vit.INIT_SCHEMES``)."""
    key = jax.random.key(ctx.config.seed)
    if not ctx.config.model.get("init"):
        scheme = ctx.config.model.get("init_scheme", "timm")
        return sharding.replicate(vit.init_params(ctx.model_cfg, key, scheme))
    from oneshui_jax.models import pretrained

    report: list[str] = []
    params = pretrained.load_pretrained(os.path.expanduser(ctx.config.model.init),
                                        ctx.model_cfg, rng=key, report=report)
    for line in report:
        logging.info("model.init: %s", line)
    return sharding.replicate(params)
