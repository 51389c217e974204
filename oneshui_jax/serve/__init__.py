"""Serving a real deletion request: portraits in, unlearned model and receipt out.

Serving is the test-time half of an unlearning method (paper section 3, 1-SHUI): a person hands
in one or more portraits (the support images) and the model forgets them with the method's
``unlearn`` (``unlearn/api.py``), using only the portraits and what the method's ``prepare``
computed before the request (its artifacts, saved by the study in the method's run directory).
The training data is gone, so only methods with ACCESS ``support`` or ``stats``
(``api.SERVABLE``: ``meta_unlearn``, ``support_ascent``, ...) can be served; ``full`` methods
(the reference's SCRUB, Bad Teacher) read the forget and retain sets at request time and are
refused.

Modules: ``request`` (portraits, labels, the :class:`Receipt`, the output directory), ``engine``
(which model and method run; the method-agnostic :class:`Engine`), ``cli`` (:func:`serve_request`
and the command line, ``python -m oneshui_jax.unlearn`` or ``python -m oneshui_jax.serve``).
"""

from oneshui_jax.serve.cli import main, serve_request, summary
from oneshui_jax.serve.engine import Engine, Prepared, resolve_sources
from oneshui_jax.serve.request import (
    RECEIPT_FILE,
    RECEIPT_VERSION,
    REQUEST_STAGE,
    Receipt,
    parse_labels,
    read_portrait,
)

__all__ = ["RECEIPT_FILE", "RECEIPT_VERSION", "REQUEST_STAGE", "Engine", "Prepared", "Receipt",
           "main", "parse_labels", "read_portrait", "resolve_sources", "serve_request", "summary"]
