"""Adam, gradient-norm clipping and learning-rate schedules for the trainer (float64 state)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamrnn.kernels.adam import adam_update

SCHEDULES = ("constant", "cosine", "plateau")


@dataclass
class Adam:
    """Adam exactly as ``torch.optim.Adam`` (bias-corrected, eps added after the square root)."""

    size: int
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.m = np.zeros(self.size)
        self.v = np.zeros(self.size)
        self.step_count = 0

    def step(self, theta: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """Update ``theta`` (float64) in place with one Adam step."""
        step, c2 = self.advance(lr)
        adam_update(theta, grad, self.m, self.v, self.beta1, self.beta2, self.eps, step, c2)

    def advance(self, lr: float) -> tuple[float, float]:
        """Count one step; its (step size lr / (1 - beta1^t), 1 - beta2^t) for the update kernel."""
        self.step_count += 1
        c1 = 1.0 - self.beta1 ** self.step_count
        c2 = 1.0 - self.beta2 ** self.step_count
        return lr / c1, c2

    def state(self) -> dict[str, np.ndarray]:
        return {"adam_m": self.m, "adam_v": self.v, "adam_step": np.array(self.step_count)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.m = np.array(state["adam_m"], np.float64)
        self.v = np.array(state["adam_v"], np.float64)
        self.step_count = int(state["adam_step"])


def clip_grad_norm(grad: np.ndarray, max_norm: float | None) -> float:
    """Scale ``grad`` in place so its L2 norm is at most ``max_norm``; returns the norm before."""
    # Not np.dot: that is a BLAS call, and OpenBLAS wakes its thread pool for a vector this
    # size, which next to Numba's just-finished parallel region stalled a step by milliseconds.
    norm = float(np.sqrt(np.sum(grad * grad)))
    if max_norm is not None and max_norm > 0 and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)  # the same formula as torch.nn.utils.clip_grad_norm_
    return norm


def cosine_factor(step: int, total_steps: int, floor: float = 0.05) -> float:
    """Cosine decay from 1 to ``floor`` over ``total_steps``."""
    if total_steps <= 1:
        return 1.0
    frac = min(step / (total_steps - 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
