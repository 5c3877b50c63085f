"""Glow (2 levels of 8 steps, 96 channels): the RealNVP campaign's schedule (a cosine over 100
epochs of 64 images, 86,000 steps, Polyak average 0.999) and its variational dequantization, at
the library's lr 1e-3, the rate Glow was shipped with (2e-3 is chosen for RealNVP only)."""

from jaxdnn.trainer import config_dict


def get_config():
    return config_dict("glow", steps=86_000, eval_every=2_000, log_every=100, checkpoint_minutes=5.0,
                       dequantization="variational")
