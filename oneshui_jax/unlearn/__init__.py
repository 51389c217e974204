"""Unlearning methods (one module per method); ``registry.METHODS`` maps names to study stages.

Kept free of imports so that the pure method code (e.g. ``meta_unlearn``) loads without the
input-pipeline dependencies (grain, tensorflow-datasets).
"""
