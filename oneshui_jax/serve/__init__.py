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
(which model and method run; the method-agnostic :class:`Engine`), ``service``
(:func:`serve_request`: one request end to end, and its :func:`summary`). The command line is
``oneshui_jax/cli/request.py`` (``python -m oneshui_jax.unlearn`` or ``python -m
oneshui_jax.serve``).
"""

import importlib

# The package's face, loaded on first use (PEP 562), so that ``serve.digest`` alone (what the
# request benchmark needs on a bare GPU machine) imports neither grain nor PIL.
_FACE = {"Engine": "engine", "Prepared": "engine", "resolve_sources": "engine",
         "RECEIPT_FILE": "request", "RECEIPT_VERSION": "request", "REQUEST_STAGE": "request",
         "Receipt": "request", "parse_labels": "request", "read_portrait": "request",
         "serve_request": "service", "summary": "service"}

__all__ = sorted(_FACE)


def __getattr__(name: str):
    if name not in _FACE:
        raise AttributeError(f"module 'oneshui_jax.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"oneshui_jax.serve.{_FACE[name]}"), name)
