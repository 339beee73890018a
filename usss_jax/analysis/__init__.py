"""Analyses of trained runs: label-space-agnostic prediction, label correspondence, t-SNE.

`commands` (what each analysis computes and writes), `scores` (pure statistics), `plots`
(figures); `python -m usss_jax.analysis <command>` is the command line.
"""
