"""jaxdnn: JAX research code for the mathematics of deep networks, as pure functions.

- `jaxdnn.flows`: NICE, RealNVP and Glow (Flax modules with exact log-determinants) and the
  flow as a distrax Distribution/Bijector; `jaxdnn.pretrained`: every shipped file (flows, the
  classifier, the conditional-mean regressor) with its card, `load(...)`.
- `jaxdnn.inpainting`: filling missing pixels with a flow (pixel- and latent-space methods);
  `jaxdnn.conditional_mean`: a supervised regressor of the missing pixels, a baseline.
- `jaxdnn.estimators`, `jaxdnn.vae`, `jaxdnn.sgd_tricks`: score-function and pathwise gradients.
- `jaxdnn.projection`: projected gradient methods; `jaxdnn.gamblers_ruin`: importance sampling
  against the exact dynamic program.
- `jaxdnn.train` / `jaxdnn.trainer`: training a flow (`jaxdnn.workdir`: a run's folder);
  `jaxdnn.data`: MNIST, checksummed.

The derivations are in docs/problems.md; `python -m experiments.<name>` runs each problem.

One side effect at import, on CPU only: jaxdnn appends `XLA_CPU_FLAGS` to XLA_FLAGS, which routes
CPU convolutions and reductions to XLA's own kernels instead of YNNPACK, faster for the flows'
train steps (docs/performance.md measures it). It is read when JAX starts its backend (import
jaxdnn before running any JAX computation) and skipped when XLA_FLAGS already sets it or
JAXDNN_XLA_DEFAULTS=0. Only jaxlib versions known to have the flag get it
(`XLA_CPU_FLAGS_JAXLIB`): XLA aborts on a flag it does not know.
"""

import os
import sys
import warnings

__version__ = "0.1.0"

XLA_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
XLA_CPU_FLAGS_JAXLIB = ((0, 10), (0, 11))  # (major, minor) of the jaxlib releases checked


def _jaxlib_release() -> tuple[int, ...] | None:
    """(major, minor) of the installed jaxlib, read without importing it; None if unknown."""
    from importlib import metadata

    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _append_xla_cpu_flags() -> None:
    if os.environ.get("JAXDNN_XLA_DEFAULTS", "1") == "0" or _jaxlib_release() not in XLA_CPU_FLAGS_JAXLIB:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in XLA_CPU_FLAGS if f.split("=")[0] not in flags]
    if not missing:
        return
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge
            started = xla_bridge.backends_are_initialized()
        except (ImportError, AttributeError):  # pragma: no cover - private API moved
            started = False
        if started and _cpu_backend():
            warnings.warn("jaxdnn was imported after JAX started its backend, so its XLA:CPU "
                          f"flags {' '.join(missing)} are not in effect (CPU convolutions run "
                          "slower); import jaxdnn first or put them in XLA_FLAGS", stacklevel=3)
            return
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


def one_cpu_device_per_core() -> None:
    """Asks XLA for one host (CPU) device per core, so work sharded over devices uses every core.

    Call before JAX starts its backend; appends to the user's XLA_FLAGS and leaves a device
    count the user already set alone. Only the CPU platform is affected."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={os.cpu_count() or 1}".strip()


def _cpu_backend() -> bool:
    import jax
    return jax.default_backend() == "cpu"


_append_xla_cpu_flags()
