"""Encoder, heads and entropy module (Flax Linen, NHWC)."""
