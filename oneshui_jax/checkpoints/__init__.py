"""Checkpoints of trained models and resumable training state (orbax).

Corresponds to the reference's ``.pth`` checkpoints ``{"args", "splits", "state_dict"}`` (SPEC.md
4.4), with orbax instead of pickles. One directory per run, like the reference::

    <root>/<dataset>/<model>/<stage>_<N>_<seed>/     run_dir(); stage: pretrain, retrain, a method
        params/          the finished model's parameters (orbax StandardCheckpointer, committed
                         atomically: written to a temporary folder, then renamed)
        metadata.json    config, splits, metrics, library versions, params_hash, created,
                         status ("training" | "done"), data_files (a finished run's orbax
                         files and sizes), metadata_hash (sha256 of its own content, run_dir
                         aside); written atomically (temp file + rename)
        train_state/     while training runs: the latest resumable state (TrainCheckpointer,
                         orbax CheckpointManager; one folder per step, the newest 1-2 kept)
        artifacts/       an unlearning method's prepared artifacts (e.g. MetaUnlearn's meta-loss;
                         save_tree, key paths recorded, hash in metadata ``artifacts_hash``)

Parameters are a plain nested dict (``vit.init_params``) whose keys are strings or ints (block
indices). Orbax stores every key as a string, so ``save_params`` records the leaf key paths with
their types (JSON keeps ints apart from strings) in the checkpoint's custom metadata, and
``load_params`` restores into a target tree rebuilt from them: the ints come back as ints.

Every failure a user can cause (missing, foreign or corrupt directory, a mismatching run) raises
one ``CheckpointError`` naming the path and what was expected; orbax's own exception is kept as
``__cause__``. A missing or resized orbax data file of a run that records ``data_files`` is named
before orbax reads the folder (orbax itself only says that an array cannot be read).

Modules, each importing only those above it:

* ``layout``: the run directory's path and folder / file names, leaf names, ``params_hash``,
  and ``check_apart`` (an output folder apart from the runs being read);
* ``metadata``: ``metadata.json`` read and written, its hash and fields, ``is_finished``;
* ``compat``: whether a checkpoint fits a request (``check_compatible``), how two differ;
* ``orbax_io``: everything that talks to orbax (``save_params``, ``load_params``, ``save_tree``,
  ``load_tree``, ``params_info``, ``remove_uncommitted``);
* ``train_state``: the resumable training state (``TrainCheckpointer``).

The device checksum of a parameter tree (``params_digest``) belongs to serving:
``oneshui_jax/serve/digest.py``.
"""

from oneshui_jax.checkpoints.compat import (
    check_compatible,
    model_config_differences,
    structure_differences,
)
from oneshui_jax.checkpoints.layout import (
    ARTIFACTS_DIR,
    METADATA_FILE,
    PARAMS_DIR,
    TRAIN_STATE_DIR,
    LeafInfo,
    Params,
    check_apart,
    leaf_name,
    named_leaves,
    overlap,
    params_hash,
    run_dir,
    short_list,
)
from oneshui_jax.checkpoints.metadata import (
    DATA_FILES,
    METADATA_HASH,
    STATUSES,
    check_metadata_hash,
    is_finished,
    library_versions,
    metadata_hash,
    read_metadata,
    run_identity,
    splits_hash,
    write_metadata,
)
from oneshui_jax.checkpoints.orbax_io import (
    KEY_PATHS,
    ORBAX_TMP_SUFFIX,
    load_params,
    load_tree,
    params_info,
    remove_uncommitted,
    save_params,
    save_tree,
)
from oneshui_jax.checkpoints.train_state import TrainCheckpointer
from oneshui_jax.errors import CheckpointError

__all__ = [
    "ARTIFACTS_DIR", "DATA_FILES", "KEY_PATHS", "METADATA_FILE", "METADATA_HASH",
    "ORBAX_TMP_SUFFIX", "PARAMS_DIR", "STATUSES", "TRAIN_STATE_DIR", "CheckpointError",
    "LeafInfo", "Params", "TrainCheckpointer", "check_apart", "check_compatible",
    "check_metadata_hash", "is_finished", "leaf_name", "library_versions", "load_params",
    "load_tree", "metadata_hash", "model_config_differences", "named_leaves", "overlap",
    "params_hash", "params_info", "read_metadata", "remove_uncommitted", "run_dir",
    "run_identity", "save_params", "save_tree", "short_list", "splits_hash",
    "structure_differences", "write_metadata",
]
