"""CamVid (11) + IDD-Lite (7): the real pair in ../shared/data, sized for 2 CPU cores.

  python launch.py --config=configs/camvid_iddlite.py --workdir=runs/ci
  python launch.py --config=configs/camvid_iddlite.py:validation --workdir=runs/ci_val
  python -m usss_jax.ablation --config=configs/camvid_iddlite.py --workdir=runs/study \
      --seeds=0 --methods=single,basic,consistency --recommended=consistency

The defaults are the reported recipe (docs/RESULTS.md), 3000 steps of training in all: 1000
steps of self-supervised pretraining on the unlabeled images, a 1500-step supervised warm start,
then 1500 steps of consistency (config_lib.recommended_recipe). The ablation trains the
supervised methods (single, basic) for the same 3000 steps, from scratch: they use no
unlabeled image.

Reported evaluation: CamVid test and IDD-Lite val. With the argument "validation" the runs
evaluate on validation data instead (CamVid val, and 200 IDD-Lite training images held out of
every run's pools), which is where recipes and hyper-parameters are chosen.
"""

from usss_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.domain_names = ("camvid", "idd_lite")
  c.domains.camvid = config_lib.domain("camvid", config_lib.dataset_root("camvid"),
                                       crop=(96, 128), resize=(180, 240), eval_resize=(180, 240),
                                       scale_range=(0.8, 1.2), eval_split="test",
                                       list_suffix=".subset")
  c.domains.idd_lite = config_lib.domain("idd_lite", config_lib.dataset_root("idd_lite"),
                                         crop=(96, 128), resize=(114, 160), eval_resize=(114, 160),
                                         scale_range=(0.8, 1.2), eval_split="val", holdout=200)
  if arg == "validation":
    c.domains.camvid.eval_split = "val"
    c.domains.idd_lite.eval_split = "holdout"
  elif arg:
    raise ValueError(f"configs/camvid_iddlite.py: unknown argument {arg!r} (use 'validation')")
  c.num_labeled = 10
  c.encoder = "drn_d_22"
  c.encoder_channels = (8, 16, 32, 48, 64, 96, 96, 96)
  c.embedding_dim = 32
  c.learning_rate = 0.02
  c.labeled_batch = 4
  c.unlabeled_batch = 4
  config_lib.recommended_recipe(c, length=3000)
  c.label_embeddings.pretrain_steps = 400  # the ablation reuses its single-source runs instead
  c.log_every = 50
  c.eval_every = 3000  # the final model only: nothing is selected on the evaluation splits
  c.checkpoint_every = 250
  c.eval_batch = 8
  return c
