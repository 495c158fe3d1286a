"""The train state (parameters, optimizer state, counters) and its pure initializer;
`train.plan` plans it on a mesh and `build_state` builds it there."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

import sharding
from models import Transformer
from train.config import Config
from train.dp_sgd import DpStep, make_dp_step
from train.optimizer import make_optimizer
from train.startup import compile_options


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (part of the jit cache key)."""

    z_loss: float
    schedule: Callable[[jax.Array], jax.Array]
    lora: bool = False  # only the LoRA adapters are trained (split_trainable)
    dropout_seed: int | None = None  # LoRA dropout's keys: from (seed, step, microbatch)
    objective: str = "lm"  # train.objective: lm or dpo (train/dpo.py)
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0
    dp: DpStep | None = None  # DP-SGD (privacy.dp_sgd; train/dp_sgd.py)


def split_trainable(params: nnx.State, lora: bool) -> tuple[nnx.State, nnx.State]:
    """(what the optimizer trains, what stays frozen): with LoRA the adapters
    (nnx.LoRAParam) and the base weights, else every parameter and nothing."""
    if not lora:
        return params, nnx.State({})
    return nnx.split_state(params, nnx.LoRAParam, ...)


def combine(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
    """split_trainable's parts back into one parameter State."""
    return nnx.merge_state(trainable, frozen) if len(jax.tree.leaves(frozen)) else trainable


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (batches consumed)
    skipped: jax.Array  # int32 scalar: steps whose update was dropped as non-finite
    params: nnx.State  # nnx.Param nodes carrying `logical_axes`
    opt_state: optax.OptState
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    step_cfg: StepConfig = struct.field(pytree_node=False)
    # DPO with full fine-tuning: the frozen reference model's parameters (the starting
    # ones; not checkpointed: read again from where they came). None otherwise.
    reference: nnx.State | None = None

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def _logical_axes(node: Any):
    return node.get_metadata().get("logical_axes") if _is_variable(node) else None


def state_shardings(abstract_state: Any, mesh: Mesh, rules: sharding.rules.Rules) -> Any:
    """NamedShardings for every array in the state, from its logical axes and the rules."""
    return sharding.tree_shardings(abstract_state, rules, mesh, _logical_axes, _is_variable)


def make_init(cfg: Config, mesh: Mesh, rules, privacy=None
              ) -> Callable[[jax.Array], TrainState]:
    """init(key) -> TrainState; pure, so it can be eval_shape'd and jitted. `privacy`:
    DP-SGD's settings resolved against the data (train/privacy.py)."""
    constrain = sharding.ActivationSharding.create(mesh, rules)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, constrain)
    lora = cfg.model.lora
    step_cfg = StepConfig(z_loss=cfg.train.z_loss, schedule=schedule, lora=lora.enabled,
                          dropout_seed=cfg.train.seed if lora.enabled and lora.dropout > 0
                          else None, objective=cfg.train.objective, dpo_beta=cfg.dpo.beta,
                          dpo_label_smoothing=cfg.dpo.label_smoothing,
                          dp=make_dp_step(cfg, mesh, rules, privacy))
    reference = cfg.train.objective == "dpo" and not lora.enabled

    def init(key: jax.Array) -> TrainState:
        model = Transformer(cfg.model, rngs=nnx.Rngs(params=key), constrain=constrain)
        graphdef, params = nnx.split(model)
        trainable, _ = split_trainable(params, step_cfg.lora)  # no state for frozen weights
        return TrainState(step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                          params=params,
                          opt_state=tx.init(trainable), graphdef=graphdef, tx=tx,
                          step_cfg=step_cfg, reference=params if reference else None)

    return init


def init_state(init: Callable[[jax.Array], TrainState], shardings: Any, seed: int
               ) -> TrainState:
    """jit(init) with `shardings` as its output layout, run once on the seed's key."""
    key = jax.random.key(seed)
    init_fn = jax.jit(init, out_shardings=shardings).lower(key)
    return init_fn.compile(compile_options(shardings))(key)


def state_with_params(init: Callable[[jax.Array], TrainState], shardings: Any, seed: int,
                      params: nnx.State) -> TrainState:
    """The state `init` builds, with these parameters (already laid out on their
    shardings; with LoRA the frozen base, the adapters staying fresh) in place of fresh
    ones and the optimizer state initialised from them: fine-tuning's start. Fresh
    parameters that are replaced are never computed (jit drops them)."""
    def build(key, params):
        state = init(key)
        if state.step_cfg.lora:
            params = combine(split_trainable(state.params, True)[0], params)
        trainable, _ = split_trainable(params, state.step_cfg.lora)
        reference = None if state.reference is None else params
        return state.replace(params=params, opt_state=state.tx.init(trainable),
                             reference=reference)

    key = jax.random.key(seed)
    fn = jax.jit(build, out_shardings=shardings, donate_argnums=1).lower(key, params)
    return fn.compile(compile_options(shardings))(key, params)
