"""Normalizing flows: bijective layers and the NICE / RealNVP / Glow models, built by name."""

import dataclasses

from jaxdnn.config import Field, check_config
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
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def config_schema(name: str) -> dict[str, Field]:
    """The typed configuration of model `name`: its Flax module's dataclass fields (type and
    default: the shipped models are trained with the defaults) and their allowed values. The
    prior (standard normal; logistic for NICE) is part of the model, not of its config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    cls = MODELS[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name", "prior")}
    schema = {}
    for k, f in fields.items():
        kind = _TYPES[str(f.type)]
        low, high = cls.RANGES.get(k, (1, None)) if kind is int else (None, None)  # counts and widths >= 1
        schema[k] = Field(kind, f.default, cls.CHOICES.get(k), low, high)
    return schema


def model_config(name: str, **overrides) -> dict:
    """The full configuration of model `name`, its defaults updated by `overrides`; raises
    ValueError for an unknown key (naming the nearest), a wrong type or a value not allowed."""
    return check_config(f"{name} config", config_schema(name), overrides)


CONFIGS = {name: model_config(name) for name in MODELS}  # the defaults, for reading


def build_model(name: str, **overrides) -> MultiScaleFlow:
    """The model `name` ("nice" | "realnvp" | "glow") with its default config updated by overrides."""
    config = model_config(name, **overrides)  # checks the name first
    return MODELS[name](**config)


__all__ = [
    "CONFIGS", "MODELS", "NICE", "ActNorm", "Chain", "ConditionalInvConv1x1", "Coupling", "Glow",
    "InvConv1x1", "Logit", "MultiScaleFlow", "RealNVP", "Repeat", "Reshape", "Scaling", "Squeeze",
    "build_model", "checkerboard_mask", "config_schema", "model_config", "half_mask", "squeeze", "unsqueeze",
]
