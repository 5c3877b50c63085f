"""jaxdnn: pure-JAX research code for flows, gradient estimators, projected gradients and IS."""

__version__ = "0.1.0"
