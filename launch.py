"""usss-jax launcher: `python launch.py --config=configs/demo.py --workdir=runs/demo`.

The same as the `usss-jax` console script of an installed package; see usss_jax/launcher.py
for the flags and modes (train, embed, eval, predict, config).
"""

from usss_jax import launcher

if __name__ == "__main__":
  launcher.run()
