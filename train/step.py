"""The train step: next-token cross-entropy, gradient accumulation, one optimizer update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.state import TrainState


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, z_loss: float
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Mean next-token loss (+ z_loss * mean(logsumexp^2)); returns (total, (ce, z)).

    The target logit is picked by a one-hot product rather than a gather, which
    partitions cleanly when the vocabulary is sharded.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    onehot_BTV = jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=logits_BTV.dtype)
    target_BT = jnp.sum(logits_BTV * onehot_BTV, axis=-1)
    ce = jnp.mean(lse_BT - target_BT)
    z = z_loss * jnp.mean(jnp.square(lse_BT))
    return ce + z, (ce, z)


def loss_fn(params: nnx.State, state: TrainState, inputs_BT: jax.Array, targets_BT: jax.Array):
    model = nnx.merge(state.graphdef, params)
    logits_BTV = model(inputs_BT)
    return cross_entropy(logits_BTV, targets_BT, state.step_cfg.z_loss)


def compute_grads(state: TrainState, batch: dict[str, jax.Array]):
    """Mean loss and gradients over the batch's microbatches.

    batch["inputs"], batch["targets"]: int32 (M, B/M, T). Microbatches run one after
    another (lax.scan) so activation memory is that of B/M sequences; each has the same
    token count, so averaging their means equals the mean over the whole batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    inputs_MBT, targets_MBT = batch["inputs"], batch["targets"]
    num_micro = inputs_MBT.shape[0]
    if num_micro == 1:
        (_, (ce, z)), grads = grad_fn(state.params, state, inputs_MBT[0], targets_MBT[0])
        return ce, z, grads

    def accumulate(carry, micro):
        ce_sum, z_sum, grad_sum = carry
        (_, (ce, z)), grads = grad_fn(state.params, state, *micro)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (ce_sum + ce, z_sum + z, grad_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (ce_sum, z_sum, grad_sum), _ = jax.lax.scan(accumulate, init, (inputs_MBT, targets_MBT))
    grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grad_sum, state.params)
    return ce_sum / num_micro, z_sum / num_micro, grads


def train_step(state: TrainState, batch: dict[str, jax.Array]
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. Metrics: loss (cross-entropy), z_loss, grad_norm (before
    clipping), lr (the rate this step used), nonfinite (1 if the loss or gradient norm
    was NaN/Inf), skipped_steps (how many updates were dropped so far).

    A non-finite step never reaches the parameters: its update is dropped in-graph
    (the loop then stops or goes on, per train.nonfinite), so the state, and any
    checkpoint of it, stays the last good one.
    """
    ce, z, grads = compute_grads(state, batch)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(ce) & jnp.isfinite(z) & jnp.isfinite(grad_norm)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    skipped = state.skipped + (~ok).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, skipped=skipped,
                              params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss": ce, "z_loss": z, "grad_norm": grad_norm,
               "lr": state.step_cfg.schedule(state.step), "nonfinite": (~ok).astype(jnp.int32),
               "skipped_steps": skipped}
    return new_state, metrics


def jit_train_step(state_shardings, batch_shardings):
    """train_step jitted with explicit shardings; the old state's buffers are donated."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0)
