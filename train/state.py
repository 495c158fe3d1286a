"""Sharded train state, built abstract-first so no full-size array sits on one device.

`build_state(cfg, mesh)` is the public builder: config + mesh -> sharded TrainState.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sharding
from models import Transformer
from train.config import Config, ConfigError
from train.optimizer import make_optimizer
from train.xla_flags import compile_options


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (part of the jit cache key)."""

    z_loss: float
    schedule: Callable[[jax.Array], jax.Array]


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (batches consumed)
    skipped: jax.Array  # int32 scalar: steps whose update was dropped as non-finite
    params: nnx.State  # nnx.Param nodes carrying `logical_axes`
    opt_state: optax.OptState
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    step_cfg: StepConfig = struct.field(pytree_node=False)

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def _logical_axes(node: Any):
    return node.get_metadata().get("logical_axes") if _is_variable(node) else None


def state_shardings(abstract_state: Any, mesh: Mesh, rules: sharding.rules.Rules) -> Any:
    """NamedShardings for every array in the state, from its logical axes and the rules."""
    return sharding.tree_shardings(abstract_state, rules, mesh, _logical_axes, _is_variable)


def make_init(cfg: Config, mesh: Mesh, rules) -> Callable[[jax.Array], TrainState]:
    """init(key) -> TrainState; pure, so it can be eval_shape'd and jitted."""
    constrain = sharding.ActivationSharding.create(mesh, rules)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    step_cfg = StepConfig(z_loss=cfg.train.z_loss, schedule=schedule)

    def init(key: jax.Array) -> TrainState:
        model = Transformer(cfg.model, rngs=nnx.Rngs(params=key), constrain=constrain)
        graphdef, params = nnx.split(model)
        return TrainState(step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                          params=params,
                          opt_state=tx.init(params), graphdef=graphdef, tx=tx,
                          step_cfg=step_cfg)

    return init


def plan_state(cfg: Config, mesh: Mesh, rules) -> tuple[Callable, TrainState, Any]:
    """(init, abstract state, shardings): everything but the arrays themselves."""
    init = make_init(cfg, mesh, rules)
    abstract = jax.eval_shape(init, jax.random.key(cfg.train.seed))
    return init, abstract, state_shardings(abstract, mesh, rules)


def build_state(cfg: Config, mesh: Mesh, rules=None) -> tuple[TrainState, Any]:
    """Sharded TrainState for `cfg` on `mesh`, and the shardings it was built with.

    Abstract first: eval_shape the init, resolve shardings from logical axes, then
    jit(init, out_shardings) so every array is created already distributed.
    """
    rules = rules if rules is not None else sharding.make_rules(cfg.sharding.rules,
                                                                mesh.axis_names)
    init, _, shardings = plan_state(cfg, mesh, rules)
    return init_state(init, shardings, cfg.train.seed), shardings


def init_state(init: Callable[[jax.Array], TrainState], shardings: Any, seed: int
               ) -> TrainState:
    """jit(init) with `shardings` as its output layout, run once on the seed's key."""
    key = jax.random.key(seed)
    init_fn = jax.jit(init, out_shardings=shardings).lower(key)
    return init_fn.compile(compile_options(shardings))(key)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shape(cfg: Config) -> tuple[int, int, int]:
    """A global batch entry's shape: (microbatches, sequences per microbatch, length)."""
    t = cfg.train
    return (t.microbatches, t.batch_size // t.microbatches, t.seq_len)


def batch_sharding(cfg: Config, mesh: Mesh, rules) -> NamedSharding:
    """Every batch entry's layout: sequences over the batch mesh axes."""
    return NamedSharding(mesh, sharding.logical_to_spec((None, "batch", None),
                                                        batch_shape(cfg), rules, mesh, "batch"))


def check_batch_fits(cfg: Config, mesh) -> None:
    """The per-microbatch batch must split evenly over the batch mesh axes."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % ways:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / train.microbatches="
            f"{cfg.train.microbatches} = {micro} sequences per microbatch do not divide by "
            f"mesh data x fsdp = {ways}; change the batch size or the mesh")
