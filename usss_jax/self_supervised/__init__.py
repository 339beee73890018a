"""Self-supervised pretraining of the shared encoder on the unlabeled images of every domain.

views.py: two overlapping crops of an image at a whole-cell offset; dense_contrastive.py: the
per-cell InfoNCE; data.py: the unlabeled image stream; pretrain.py: the loop and the encoder
export; `python -m usss_jax.self_supervised` runs it.
"""
