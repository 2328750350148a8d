"""The controller's constants (docs/method.md §3), declared once: the run config's `dro` section
extends them (megadrp/config.py) and the controller's settings extend them
(megadrp/dro/controller.py), so a default cannot differ between the two. Pure data."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DROConstants:
    rho: float = 0.1
    """Radius of the χ² ball around the reference ratio (paper: 0.1)."""
    min_prob: float = 0.2
    """Floor of q_i / p_i inside the ball (paper: 0.2)."""
    tol: float = 1e-4
    """Tolerance of the bisection on the ball's radius."""
    sheared_eta: float = 1.0
    """Step size of Sheared-LLaMA's exponentiated update (mode sheared)."""
    sheared_c: float = 1e-4
    """Share of the uniform mix in Sheared-LLaMA's smoothing (mode sheared)."""
    history_start: float = 0.02
    """Share of training after which evaluations enter a domain's scaling-law history."""
    fit_start: float = 0.1
    """Share of training after which scaling laws are fitted."""
    min_fit_points: int = 10
    """A domain's law is fitted once its history holds more than this many points."""
    ratio_start: float = 0.2
    """Share of training after which the reference ratio moves toward q (mode drpruning)."""
    ratio_momentum: float = 0.9
    """p ← normalise(momentum · p + (1 − momentum) · q)."""
    max_points: int = 64
    """Largest history a domain keeps (when full, one of the oldest half is dropped at random)."""
