"""Membership-inference attacks of the privacy evaluation (SPEC.md 5.4, 5.5), study-independent.

* ``loss_attack``: the random-forest loss attack printed with every evaluation (SPEC 5.4);
* ``rmia``: the reference's RMIA on losses (SPEC 5.5, Q5, Q6) and canonical RMIA as an extra;
* ``per_person``: the attack at the level of people (mean / max of per-image scores);
* ``roc``: ROC figure of every attack for every method.

Pure numpy / scikit-learn / matplotlib; modules are imported on demand
(``from oneshui_jax.mia import rmia``).
"""
