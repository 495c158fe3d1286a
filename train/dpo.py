"""Direct Preference Optimization (train.objective=dpo): the loss of Rafailov et al.
(2023) in TRL's sigmoid form, with optional label smoothing (conservative DPO):

    h = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
    loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)

averaged over the pairs of the global batch, where log pi(answer) sums the log-probs of
the answer's tokens only (the prompt's weigh 0). Pairs come packed
(train/data/packing.py PackedExamples with pairs): in each sequence, segments 2j+1 and
2j+2 are pair j's chosen and rejected answers, masked from each other. The reference
is the model before fine-tuning: with LoRA the base without its adapters (the same
weights, the adapters zeroed), with full fine-tuning a frozen copy (TrainState.reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pair_logps(logp_BT: jax.Array, weights_BT: jax.Array, segment_ids_BT: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen_BP, rejected_BP, present_BP): each pair's summed log-probs of its trained
    tokens, per sequence P = T // 2 pair slots, and which slots hold a pair."""
    T = logp_BT.shape[1]
    P = T // 2

    def per_row(values_T, segments_T):
        return jax.ops.segment_sum(values_T, segments_T, num_segments=T + 1)

    sums_BS = jax.vmap(per_row)(logp_BT * weights_BT, segment_ids_BT)
    present_BP = 2 * jnp.arange(1, P + 1) <= jnp.max(segment_ids_BT, axis=1, keepdims=True)
    return sums_BS[:, 1:2 * P:2], sums_BS[:, 2:2 * P + 1:2], present_BP


def num_pairs(segment_ids: jax.Array) -> jax.Array:
    """How many pairs a batch (..., T) of packed pair sequences holds (fp32)."""
    return jnp.sum(jnp.max(segment_ids, axis=-1) // 2).astype(jnp.float32)


def loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
         ref_rejected: jax.Array, beta: float, label_smoothing: float = 0.0
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-pair loss, chosen reward, rejected reward); rewards are beta times the
    log-ratio of policy to reference."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    h = chosen - rejected
    per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(h)
                - label_smoothing * jax.nn.log_sigmoid(-h))
    return per_pair, chosen, rejected


def terms(logp_BT: jax.Array, ref_logp_BT: jax.Array, weights_BT: jax.Array,
          segment_ids_BT: jax.Array, total_pairs: jax.Array, beta: float,
          label_smoothing: float) -> dict[str, jax.Array]:
    """A microbatch's share (sums over its pairs / the global batch's pair count) of the
    loss and of the metrics: reward_chosen, reward_rejected, reward_margin (their
    difference) and reward_accuracy (the fraction of pairs whose chosen answer has the
    larger reward)."""
    pc, pr, present = pair_logps(logp_BT, weights_BT, segment_ids_BT)
    rc, rr, _ = pair_logps(jax.lax.stop_gradient(ref_logp_BT), weights_BT, segment_ids_BT)
    per_pair, chosen, rejected = loss(pc, pr, rc, rr, beta, label_smoothing)
    w = present.astype(jnp.float32) / total_pairs

    def mean(x):
        return jnp.sum(x * w)

    chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
    return {"loss": mean(per_pair), "reward_chosen": mean(chosen),
            "reward_rejected": mean(rejected), "reward_margin": mean(chosen - rejected),
            "reward_accuracy": mean((chosen > rejected).astype(jnp.float32))}
