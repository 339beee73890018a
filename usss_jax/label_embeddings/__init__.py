"""Label embeddings ("prototypes"): statistics (stats), file format (store), the stage that
computes them from a trained model (stage) and their EMA update during training (ema)."""

# config.label_embeddings.source: where a run's label embeddings come from.
SOURCES = ("pretrain", "file", "random")
