"""The train step: next-token cross-entropy, gradient accumulation, one optimizer update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import dp_sgd, dpo
from train.state import TrainState, combine, split_trainable


def loss_from_stats(lse_BT: jax.Array, target_BT: jax.Array, z_loss: float,
                    weights_BT: jax.Array | None = None,
                    total_weight: jax.Array | None = None
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Next-token loss (+ z_loss * logsumexp^2) from each token's logsumexp and target
    logit, averaged over the tokens with weight (all of them without weights); returns
    (total, (ce, z)). With `total_weight`, sums are divided by it instead of by this
    batch's own weight, so microbatch losses add up to the whole batch's mean."""
    if weights_BT is None:
        weights_BT = jnp.ones_like(lse_BT)
    if total_weight is None:
        total_weight = jnp.maximum(jnp.sum(weights_BT), 1.0)
    ce = jnp.sum((lse_BT - target_BT) * weights_BT) / total_weight
    z = z_loss * jnp.sum(jnp.square(lse_BT) * weights_BT) / total_weight
    return ce + z, (ce, z)


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The model's keyword arguments in a (micro)batch: packed batches with document
    masking carry positions and segment ids."""
    return {"positions_BT": batch.get("positions"), "segment_ids_BT": batch.get("segment_ids")}


MOE_TERMS = ("moe_aux_loss", "moe_z_loss", "expert_load")
DPO_TERMS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


def loss_fn(params: nnx.State, state: TrainState, micro: dict[str, jax.Array],
            total_weight: jax.Array, num_micro: int = 1, frozen: nnx.State | None = None,
            dropout_key: jax.Array | None = None, constrain=None):
    """The microbatch's share of the loss, and its terms: ce, z (logit z-loss) and, for
    MoE models, moe_aux_loss, moe_z_loss (each microbatch's, divided by num_micro so
    they add up to the mean) and expert_load. `params` are the trained ones; `frozen`
    the rest (LoRA's base weights); `dropout_key`: LoRA dropout. For DPO the terms are
    train/dpo.py's, from micro["ref_logp"] (reference_logp), and total_weight counts
    the global batch's pairs. `constrain`: activation layouts in place of the model's
    (DP-SGD's per-sequence gradients, train/dp_sgd.py)."""
    model = nnx.merge(state.graphdef, params if frozen is None else combine(params, frozen))
    if constrain is not None:
        model.constrain = constrain
    lse_BT, target_BT, moe = model.logsumexp_and_target(micro["inputs"], micro["targets"],
                                                        **model_inputs(micro),
                                                        dropout_key=dropout_key)
    sc = state.step_cfg
    if sc.objective == "dpo":  # total_weight: the global batch's pairs
        terms = dpo.terms(target_BT - lse_BT, micro["ref_logp"], micro["weights"],
                          micro["segment_ids"], total_weight, sc.dpo_beta,
                          sc.dpo_label_smoothing)
        total = terms["loss"]
    else:
        total, (ce, z) = loss_from_stats(lse_BT, target_BT, sc.z_loss, micro.get("weights"),
                                         total_weight)
        terms = {"loss": ce, "z_loss": z}
    if moe:
        m = model.cfg.moe
        terms["moe_aux_loss"] = moe["moe_aux_loss"] / num_micro
        terms["moe_z_loss"] = moe["moe_z_loss"] / num_micro
        terms["expert_load"] = jax.lax.stop_gradient(moe["expert_load"])
        total = (total + m.aux_loss_coef * terms["moe_aux_loss"]
                 + m.router_z_loss_coef * terms["moe_z_loss"])
    return total, terms


def reference_logp(state: TrainState, micro: dict[str, jax.Array]) -> jax.Array:
    """DPO's reference model's log-prob of each target (B, T): the frozen copy
    (state.reference), or with LoRA the base with its adapters zeroed."""
    if state.reference is not None:
        params = state.reference
    else:
        adapters, base = split_trainable(state.params, True)
        params = combine(jax.tree.map(jnp.zeros_like, adapters), base)
    model = nnx.merge(state.graphdef, jax.lax.stop_gradient(params))
    lse_BT, target_BT, _ = model.logsumexp_and_target(micro["inputs"], micro["targets"],
                                                      **model_inputs(micro))
    return jax.lax.stop_gradient(target_BT - lse_BT)


def total_weight(batch: dict[str, jax.Array]) -> jax.Array:
    """The tokens the loss averages over: all of them, or those with weight."""
    if "weights" in batch:
        return jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    return jnp.asarray(batch["targets"].size, jnp.float32)


def compute_grads(state: TrainState, batch: dict[str, jax.Array]):
    """The loss terms (`loss_fn`; summed over microbatches, expert_load their maximum)
    and gradients over the batch's microbatches, of the trained parameters only (with
    LoRA the adapters: split_trainable).

    Every batch entry is (M, B/M, T): inputs and targets (int32), and optionally weights
    (float32; padding and cross-document targets have 0), positions and segment_ids.
    Microbatches run one after another (lax.scan) so activation memory is that of B/M
    sequences; each divides its weighted sum by the whole batch's weight, so the sums
    equal the mean over the batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    dpo_run = state.step_cfg.objective == "dpo"
    weight = dpo.num_pairs(batch["segment_ids"]) if dpo_run else total_weight(batch)
    weight = jnp.maximum(weight, 1.0)
    num_micro = batch["inputs"].shape[0]
    trained, frozen = split_trainable(state.params, state.step_cfg.lora)
    frozen = frozen if state.step_cfg.lora else None
    seed = state.step_cfg.dropout_seed
    step_key = None if seed is None else jax.random.fold_in(jax.random.key(seed), state.step)

    def micro_key(i):
        return None if step_key is None else jax.random.fold_in(step_key, i)

    def with_reference(micro):
        return dict(micro, ref_logp=reference_logp(state, micro)) if dpo_run else micro

    if state.step_cfg.dp is not None:  # DP-SGD: per-sequence clipped gradients, noise
        def example_grad(micro, weight, key, constrain):
            return grad_fn(trained, state, micro, weight, 1, frozen, key, constrain)
        return dp_sgd.private_grads(example_grad, state.step_cfg.dp, batch, trained,
                                    state.step, micro_key)

    if num_micro == 1:
        micro = with_reference(jax.tree.map(lambda x: x[0], batch))
        (_, terms), grads = grad_fn(trained, state, micro, weight, 1, frozen, micro_key(0))
        return terms, grads

    def accumulate(carry, xs):
        term_sum, grad_sum = carry
        micro, i = xs
        micro = with_reference(micro)
        (_, terms), grads = grad_fn(trained, state, micro, weight, num_micro, frozen,
                                    micro_key(i))
        term_sum = {k: jnp.maximum(v, terms[k]) if k == "expert_load" else v + terms[k]
                    for k, v in term_sum.items()}
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (term_sum, grad_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
    keys = (("loss",) + DPO_TERMS if dpo_run else ("loss", "z_loss")) + \
        (MOE_TERMS if state.model().cfg.moe.enabled else ())
    init = ({k: jnp.zeros((), jnp.float32) for k in keys}, zeros)
    (terms, grad_sum), _ = jax.lax.scan(accumulate, init, (batch, jnp.arange(num_micro)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grad_sum, trained)
    return terms, grads


def eval_sums(model, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Validation sums of `model` over a (M, B/M, T) batch: loss_sum (weighted
    cross-entropy) and weight (tokens counted); callers divide after summing batches."""

    def one(carry, micro):
        lse_BT, target_BT, _ = model.logsumexp_and_target(micro["inputs"], micro["targets"],
                                                          **model_inputs(micro))
        w_BT = micro.get("weights", jnp.ones(micro["targets"].shape, jnp.float32))
        _, (ce_sum, _) = loss_from_stats(lse_BT, target_BT, 0.0, w_BT, jnp.float32(1.0))
        return (carry[0] + ce_sum, carry[1] + jnp.sum(w_BT)), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, weight), _ = jax.lax.scan(one, (zero, zero), batch)
    return {"loss_sum": loss_sum, "weight": weight}


def dpo_eval_sums(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """DPO's validation sums over a (M, B/M, T) batch of packed pairs: loss_sum,
    reward_margin_sum, reward_accuracy_sum and weight (the pairs counted)."""
    sc = state.step_cfg
    model = state.model()

    def one(carry, micro):
        lse_BT, target_BT, _ = model.logsumexp_and_target(micro["inputs"], micro["targets"],
                                                          **model_inputs(micro))
        terms = dpo.terms(target_BT - lse_BT, reference_logp(state, micro), micro["weights"],
                          micro["segment_ids"], jnp.float32(1.0), sc.dpo_beta,
                          sc.dpo_label_smoothing)
        return {k: carry[k] + v for k, v in (("loss_sum", terms["loss"]),
                                             ("reward_margin_sum", terms["reward_margin"]),
                                             ("reward_accuracy_sum", terms["reward_accuracy"]),
                                             ("weight", dpo.num_pairs(micro["segment_ids"])))
                }, None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(one, dict.fromkeys(("loss_sum", "reward_margin_sum",
                                               "reward_accuracy_sum", "weight"), zero), batch)
    return sums


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    if state.step_cfg.objective == "dpo":
        return dpo_eval_sums(state, batch)
    return eval_sums(nnx.merge(state.graphdef, state.params), batch)


def jit_eval_step(state_shardings, batch_shardings):
    return jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=None)


def train_step(state: TrainState, batch: dict[str, jax.Array]
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. Metrics: loss (cross-entropy), z_loss, grad_norm (before
    clipping), lr (the rate this step's update applied: 0 when it was dropped),
    nonfinite (1 if the loss or gradient norm was NaN/Inf), skipped_steps (how many
    updates were dropped so far); for MoE models also moe_aux_loss, moe_z_loss and
    expert_load (`loss_fn`). With train.objective=dpo, loss is DPO's and z_loss gives
    way to reward_chosen, reward_rejected, reward_margin and reward_accuracy (train/dpo.py).
    With DP-SGD (privacy.dp_sgd) also sequences and clipped_fraction (train/dp_sgd.py),
    and grad_norm is the noised gradient's.

    A non-finite step never reaches the parameters: its update is dropped in-graph
    (the loop then stops or goes on, per train.nonfinite), so the state, and any
    checkpoint of it, stays the last good one. The update runs under `lax.cond`, not
    as a select between the new and old state, which would be one more pass over the
    parameters and both optimizer moments.
    """
    terms, grads = compute_grads(state, batch)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(grad_norm)
    for value in terms.values():
        ok &= jnp.isfinite(value)

    def update(params, opt_state):
        updates, opt_state = state.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    trained, frozen = split_trainable(state.params, state.step_cfg.lora)
    trained, opt_state = jax.lax.cond(ok, update, lambda *old: old, trained, state.opt_state)
    params = combine(trained, frozen)
    skipped = state.skipped + (~ok).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, skipped=skipped, params=params,
                              opt_state=opt_state)
    # optax's schedule counts the updates it applied, not the steps taken
    lr = jnp.where(ok, state.step_cfg.schedule(state.step - state.skipped), 0.0)
    metrics = {**terms, "grad_norm": grad_norm, "lr": lr,
               "nonfinite": (~ok).astype(jnp.int32), "skipped_steps": skipped}
    return new_state, metrics


def jit_train_step(state_shardings, batch_shardings):
    """train_step jitted with explicit shardings; the old state's buffers are donated."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0)
