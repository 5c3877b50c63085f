"""Inpainting with a flow (Problem 3): fill the missing pixels of X_true given the observed ones.

    minimize_X  -log p(X)   subject to  M*X = M*X_true,  0 <= X <= 1     (M: 1 = observed)

One entry point, `inpaint(flow, image, mask, key, method=...)`, over five methods in two
families, every one ending inside the constraint set C (observed pixels bit-for-bit, values in
[0, 1]) and running on the whole batch in jitted chunks:

- pixel space (`pixel.py`): ``pgd`` (the course: 300 projected gradient steps of 1e-3 from
  missing pixels at 1), ``annealed`` (projected, Adam-preconditioned Langevin with annealing),
  ``langevin`` (posterior mean of Langevin chains in logit coordinates);
- latent space (`latent.py`): ``latent_map`` (the MAP of the flow's latents given the observed
  pixels, decoded) and ``latent`` (several such searches weighted by their posterior energies:
  an estimate of the posterior mean, a heuristic: short searches weighted by their energies).

The flow's posterior itself (`posterior.py`): `inpaint_posterior` samples p(x | observation)
at temperature 1 by HMC (observed pixels as 8-bit bins, or noisy, or downsampled), with the
scores of a sample (`crps`, `energy_score`).

Also: masks, input checks and scores (`masks.py`), fills without a flow (`baselines.py`). The
supervised conditional-mean network (`jaxdnn.conditional_mean`) is a baseline that `evaluate`
scores beside the flow, never part of a flow method.
"""

from __future__ import annotations

from jaxdnn.inpainting.baselines import (
    KNN,
    knn_mean,
    mean_fill,
    nearest_neighbor,
    nearest_training_images,
    pixel_mean,
)
from jaxdnn.inpainting.latent import LATENT_DEFAULTS, LATENT_MAP_DEFAULTS, Flow, as_flow, latent_energy
from jaxdnn.inpainting.masks import (
    IMAGE_SHAPE,
    MASKS,
    UNSEEN_MASKS,
    batch_masks,
    check_images,
    check_mask,
    make_mask,
    masked_mse,
    masked_psnr,
)
from jaxdnn.inpainting.methods import (
    DEFAULTS,
    FLOW_STEPS,
    LATENT_METHODS,
    METHODS,
    PIXEL_METHODS,
    STEPS,
    InpaintResult,
    check_options,
    default_steps,
    flow_log_prob,
    inpaint,
)
from jaxdnn.inpainting.pixel import (
    ANNEALED_DEFAULTS,
    LANGEVIN_DEFAULTS,
    PGD_DEFAULTS,
    annealed_optimizer,
    pgd_optimizer,
)
from jaxdnn.inpainting.posterior import POSTERIOR_DEFAULTS, Posterior, crps, energy_score, inpaint_posterior
from jaxdnn.inpainting.scoring import BASELINES, evaluate

__all__ = [
    "ANNEALED_DEFAULTS", "BASELINES", "DEFAULTS", "IMAGE_SHAPE", "KNN", "LANGEVIN_DEFAULTS", "LATENT_DEFAULTS",
    "LATENT_MAP_DEFAULTS", "LATENT_METHODS", "MASKS", "METHODS", "PGD_DEFAULTS", "PIXEL_METHODS", "POSTERIOR_DEFAULTS",
    "STEPS", "UNSEEN_MASKS", "crps", "energy_score",
    "FLOW_STEPS", "Flow", "InpaintResult", "Posterior", "annealed_optimizer", "as_flow", "batch_masks", "check_images",
    "check_mask", "check_options", "default_steps", "evaluate", "inpaint_posterior",
    "flow_log_prob", "inpaint", "knn_mean", "latent_energy", "make_mask", "masked_mse", "masked_psnr",
    "mean_fill", "nearest_neighbor", "nearest_training_images", "pgd_optimizer", "pixel_mean",
]
