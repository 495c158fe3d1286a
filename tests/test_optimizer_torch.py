"""Our AdamW (with its weight-decay mask and clipping) against torch.optim.AdamW."""

import numpy as np
import pytest

from train.config import OptimizerConfig
from train.optimizer import make_optimizer

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the Python 3.12 CI run leaves torch tests out")


def test_adamw_matches_torch():
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    s0 = rng.normal(size=(3,)).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)) * 3, rng.normal(size=(3,)) * 3) for _ in range(4)]
    cfg = OptimizerConfig(lr=0.05, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1,
                          b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0)
    tx, _ = make_optimizer(cfg, total_steps=10)  # constant lr: warmup 0, no decay range
    params = {"w_up": jnp.asarray(w0), "mlp_norm_scale": jnp.asarray(s0)}
    opt_state = tx.init(params)

    tw = torch.nn.Parameter(torch.tensor(w0))
    ts = torch.nn.Parameter(torch.tensor(s0))
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1},
                              {"params": [ts], "weight_decay": 0.0}],
                             lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    for gw, gs in grads:
        g = {"w_up": jnp.asarray(gw, jnp.float32), "mlp_norm_scale": jnp.asarray(gs, jnp.float32)}
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        tw.grad = torch.tensor(gw, dtype=torch.float32)
        ts.grad = torch.tensor(gs, dtype=torch.float32)
        torch.nn.utils.clip_grad_norm_([tw, ts], max_norm=1.0)
        topt.step()
        np.testing.assert_allclose(params["w_up"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(params["mlp_norm_scale"], ts.detach().numpy(), rtol=1e-5,
                                   atol=1e-6)
