"""The ESGD-M update rule, in one place.

For every parameter ``p`` with gradient ``g`` (and, on a D-step, Hessian-vector
product ``h``), with its group's hyper-parameters::

    m     <- b1 * m + (1 - b1) * g
    bias  <- bias * b1
    if D-step:
        D    <- max(b2 * D, h * h)          # Adamax-style inf norm of squared HVPs
        warm <- warm * lr_warmup            # only D-steps advance the warmup
    alpha <- lr * (1 - warm)                # warmup-scaled step size
    mhat  <- m + (1 - b1) * (g - m)         # Nesterov look-ahead
    c     <- 1 - bias * b1                  # momentum bias correction
    p     <- p * (1 - weight_decay * alpha) # decoupled weight decay
    p     <- p - (alpha / c) * mhat / (sqrt(D) + eps)

The per-parameter scalars (``bias``, ``warm``, ``alpha``, ``c``) are computed here on
the host in float64 by :func:`host_scalars`, which folds them into two numbers per
tensor: ``step_scale = alpha / c`` and ``decay = 1 - weight_decay * alpha``.  The
element-wise part (the lines that touch ``m``, ``D`` and ``p``) is what the backends
implement, each in its own language, always in float32 or wider:

* ``esgdm/backends/torch_impl.py``   -- PyTorch foreach ops (``"torch"``)
* ``kernels/esgdm_step.py``          -- the fused Triton kernel (``"triton"``)
* ``csrc/esgdm_update.h``            -- shared by the C++ CPU and CUDA kernels
                                        (``"cpu"``, ``"cuda"``)

Every backend receives the per-tensor scalars as a float64 CPU tensor of shape
``[n_tensors, 5]`` whose columns are :data:`SCALAR_COLUMNS`.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

#: Columns of the per-tensor scalar table handed to every backend.
SCALAR_COLUMNS = ("beta1", "beta2", "eps", "step_scale", "decay")
BETA1, BETA2, EPS, STEP_SCALE, DECAY = range(len(SCALAR_COLUMNS))

#: Columns of the per-group hyper-parameter table built at each step.
GROUP_COLUMNS = ("lr", "beta1", "beta2", "lr_warmup", "eps", "weight_decay")


def group_table(param_groups) -> np.ndarray:
    """float64 ``[n_groups, 6]`` table of each group's hyper-parameters (GROUP_COLUMNS)."""
    rows = []
    for g in param_groups:
        lr = g["lr"]
        lr = float(lr.item() if isinstance(lr, Tensor) else lr)
        b1, b2 = g["betas"]
        rows.append((lr, float(b1), float(b2), float(g["lr_warmup"]), float(g["eps"]),
                     float(g["weight_decay"])))
    return np.array(rows, dtype=np.float64).reshape(-1, len(GROUP_COLUMNS))


def host_scalars(
    hparams: np.ndarray, bias: np.ndarray, warm: np.ndarray, d_step: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Advances the per-tensor scalars by one step, without writing anything.

    Args:
        hparams: ``[n, 6]`` float64, each tensor's group row of :func:`group_table`.
        bias, warm: ``[n]`` float64, the tensors' current ``bias`` and ``warm``.
        d_step: whether this step refreshes the curvature estimate.

    Returns:
        ``(new_bias, new_warm, scalars)`` where ``scalars`` is the ``[n, 5]`` table
        (SCALAR_COLUMNS) that the backends consume (as a tensor, via torch.from_numpy).
    """
    lr, b1, b2, lr_warmup, eps, wd = hparams.T
    new_bias = bias * b1
    new_warm = warm * lr_warmup if d_step else warm.copy()
    alpha = lr * (1 - new_warm)
    c = 1 - new_bias * b1
    scalars = np.stack([b1, b2, eps, alpha / c, 1 - wd * alpha], axis=1)
    return new_bias, new_warm, scalars


__all__ = ["SCALAR_COLUMNS", "GROUP_COLUMNS", "group_table", "host_scalars"]
