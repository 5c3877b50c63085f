"""Normalizing flows: bijective layers and the NICE / RealNVP / Glow models, built by name."""

from jaxdnn.flows.layers import (
    ActNorm,
    Chain,
    ConditionalInvConv1x1,
    Coupling,
    InvConv1x1,
    Logit,
    Repeat,
    Reshape,
    Scaling,
    Squeeze,
    checkerboard_mask,
    half_mask,
    squeeze,
    unsqueeze,
)
from jaxdnn.flows.models import NICE, Glow, MultiScaleFlow, RealNVP

MODELS = {"nice": NICE, "realnvp": RealNVP, "glow": Glow}

# Default configurations (the shipped models are trained with these).
CONFIGS = {
    "nice": dict(couplings=4, hidden=1000, depth=5, preprocessing="none"),
    "realnvp": dict(levels_count=2, pairs=1, final_pairs=2, hidden=48, blocks=1),
    "glow": dict(levels_count=2, steps_per_level=8, hidden=96),
}


def build_model(name: str, **overrides) -> MultiScaleFlow:
    """The model `name` ("nice" | "realnvp" | "glow") with its default config updated by overrides."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    config = {**CONFIGS[name], **overrides}
    unknown = set(config) - set(MODELS[name].__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config keys for {name}: {sorted(unknown)}")
    return MODELS[name](**config)


__all__ = [
    "CONFIGS", "MODELS", "NICE", "ActNorm", "Chain", "ConditionalInvConv1x1", "Coupling", "Glow",
    "InvConv1x1", "Logit", "MultiScaleFlow", "RealNVP", "Repeat", "Reshape", "Scaling", "Squeeze",
    "build_model", "checkerboard_mask", "half_mask", "squeeze", "unsqueeze",
]
