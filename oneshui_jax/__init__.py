"""oneshui_jax: the 1-SHUI benchmark and MetaUnlearn in JAX/Flax.

Reimplements "Unlearning Personal Data from a Single Image" (De Min et al., TMLR 2025): identity
unlearning for vision models from one portrait per person, its benchmark (1-SHUI), its method
(MetaUnlearn), baselines, metrics and attacks.
"""

__version__ = "0.1.0"
