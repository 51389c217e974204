"""Errors that users see: one clear message naming the file or setting and what was expected."""

import math


class DataError(ValueError):
    """A data directory, annotation file, image or record is missing or malformed.

    The message names the path (and line, where there is one) and the layout that was expected.
    """


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting and what was expected."""


class CheckpointError(ValueError):
    """A checkpoint is missing, foreign, corrupt or does not match the request.

    The message names the path and what was expected there; an underlying orbax / tensorstore
    error, if any, is kept as ``__cause__``.
    """


class TrainingDiverged(ConfigError, FloatingPointError):
    """A loss became NaN or infinite (training, meta-training or a method's loop). A ConfigError
    (a learning rate too large is the usual cause), so every command line prints its one line
    and exits with status 2; the message names the stage or method, the epoch and what was
    kept (:func:`check_finite`)."""


# What a method that diverged kept (its loop stops; nothing is written)
METHOD_KEPT = "nothing of the method's run was kept (the model it started from is unchanged)"


def check_finite(values: dict, *, where: str, when: str, kept: str, advice: str) -> None:
    """``TrainingDiverged`` when one of ``values`` (name -> a float or None) is NaN or infinite.

    The message: ``"<where>: the <name> became nan in <when>; training stopped and <kept>.
    <advice>"``, e.g. where="scrub", when="epoch 2 (epochs 0-4)", kept="nothing of the method's
    run was kept", advice="Lower config.scrub.lr (0.1) or check the data".
    """
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise TrainingDiverged(f"{where}: the {name} became {value} in {when}; training "
                                   f"stopped and {kept}. {advice}")
