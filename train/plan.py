"""Setup once: config -> mesh -> rules -> the planned (abstract, sharded) train state and
the batch layout. Training, evaluation, generation, export, conversion, the pre-flight
and the layout tool all start from `plan(cfg)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

import sharding
from models.attention import splash_fits
from train.config import Config, ConfigError
from train.state import TrainState, init_state, make_init, split_trainable, state_shardings


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything about a run's arrays but the arrays themselves."""

    cfg: Config
    mesh: Mesh
    rules: sharding.rules.Rules
    init: Callable[[jax.Array], TrainState]  # key -> TrainState, pure (jit it)
    abstract: TrainState  # ShapeDtypeStructs (jax.eval_shape of init)
    shardings: Any  # a NamedSharding for every array of the state

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        """A global batch entry's shape: (microbatches, sequences per microbatch, length)."""
        t = self.cfg.train
        return (t.microbatches, t.batch_size // t.microbatches, t.seq_len)

    @property
    def batch_sharding(self) -> NamedSharding:
        """Every batch entry's layout: sequences over the rules' batch mesh axes, their
        length over the context axes (the load-balanced order, train/data/batches.py)."""
        return NamedSharding(self.mesh, sharding.logical_to_spec(
            (None, "batch", "act_length"), self.batch_shape, self.rules, self.mesh, "batch"))

    @property
    def context_ways(self) -> int:
        """How many shards each sequence's length is split into (1: not split)."""
        return context_ways(self.mesh, self.rules)

    def check_batches(self) -> None:
        check_batches(self.cfg, self.mesh, self.rules)

    def state_target(self) -> dict[str, Any]:
        """ShapeDtypeStructs with the target shardings of the arrays a checkpoint holds:
        Orbax restores straight into them, resharding when the checkpoint was written on
        another mesh."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state_arrays(self.abstract), state_arrays(self.shardings))

    def params_target(self):
        """The parameters a checkpoint holds (of `state_target()`: with LoRA the
        adapters), an nnx.State of ShapeDtypeStructs with their shardings."""
        return self.state_target()["params"]

    def base_target(self):
        """Every parameter but LoRA's adapters (what model.init_from reads; the frozen
        base with LoRA, all of them without), as ShapeDtypeStructs with shardings."""
        full = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract.params, self.shardings.params)
        return split_trainable(full, True)[1] if self.cfg.model.lora.enabled else full

    def abstract_state(self) -> TrainState:
        """The abstract state with its shardings attached (for ahead-of-time lowering)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)


def state_arrays(state) -> dict[str, Any]:
    """The arrays of a TrainState that a checkpoint holds: with LoRA the adapters, not
    the frozen base its config names (model.init_from)."""
    params = split_trainable(state.params, state.step_cfg.lora)[0]
    return {"step": state.step, "skipped": state.skipped, "params": params,
            "opt_state": state.opt_state}


def check_batches(cfg: Config, mesh: Mesh, rules: sharding.rules.Rules) -> None:
    """A ConfigError unless a microbatch splits evenly over the batch axes."""
    t, ways = cfg.train, sharding.batch_ways(mesh, rules)
    micro = t.batch_size // t.microbatches
    if micro % ways:
        axes = " x ".join(rules["batch"]) or "(none)"
        raise ConfigError(
            f"train.batch_size={t.batch_size} / train.microbatches={t.microbatches} = "
            f"{micro} sequences per microbatch do not divide by mesh {axes} = {ways}; "
            "change the batch size or the mesh")


def context_ways(mesh: Mesh, rules: sharding.rules.Rules) -> int:
    return math.prod(mesh.shape[a] for a in rules["act_length"])


def check_context(cfg: Config, mesh: Mesh, rules: sharding.rules.Rules,
                  batches: bool) -> None:
    """A ConfigError for a `context` mesh axis nothing is split over, a sequence that
    does not cut into 2 x ways equal chunks (load balancing), or ring attention asked of
    cuDNN."""
    used = {a for axes in rules.values() for a in axes}
    if mesh.shape.get("context", 1) > 1 and "context" not in used:
        raise ConfigError(f"mesh.context={mesh.shape['context']} but sharding.rules "
                          f"{cfg.sharding.rules!r} splits nothing over it; use the "
                          "fsdp_cp or fsdp_tp_cp rules, or set mesh.context=1")
    ways = context_ways(mesh, rules)
    if ways == 1:
        return
    if batches and cfg.train.seq_len % (2 * ways):
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} does not divide by 2 x the "
                          f"{ways} context ways (load balancing holds two chunks per "
                          f"shard); pick a length that is a multiple of {2 * ways}")
    chunk = cfg.train.seq_len // (2 * ways)
    if cfg.model.attention == "splash" and batches and not splash_fits(chunk):
        raise ConfigError(f"model.attention=splash needs chunks of a multiple of 128 tokens "
                          f"(train.seq_len / (2 x {ways} context ways) = {chunk}); pick "
                          f"train.seq_len a multiple of {256 * ways} or model.attention=auto")
    if cfg.model.context_attention == "ring" and cfg.model.attention == "cudnn":
        raise ConfigError("model.context_attention=ring needs each block's log-sum-exp, "
                          "which cuDNN's attention does not return; use "
                          "model.context_attention=all_gather or model.attention=auto")


def check_experts(cfg: Config, mesh: Mesh, rules: sharding.rules.Rules) -> None:
    """A ConfigError for an `expert` mesh axis nothing is split over, or experts that do
    not divide by the ways they are split."""
    used = {a for axes in rules.values() for a in axes}
    if mesh.shape.get("expert", 1) > 1 and "expert" not in used:
        raise ConfigError(f"mesh.expert={mesh.shape['expert']} but sharding.rules "
                          f"{cfg.sharding.rules!r} splits nothing over it; use the "
                          "fsdp_ep or fsdp_tp_ep rules, or set mesh.expert=1")
    moe = cfg.model.moe
    ways = math.prod(mesh.shape[a] for a in rules["experts"])
    if moe.enabled and moe.num_experts % ways:
        axes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in rules["experts"])
        raise ConfigError(f"model.moe.num_experts={moe.num_experts} does not divide by the "
                          f"{ways} expert ways ({axes}); pick an expert axis that divides it")


def plan(cfg: Config, devices: Sequence[jax.Device] | None = None, *,
         mesh: Mesh | None = None, rules: sharding.rules.Rules | None = None,
         batches: bool = True, privacy=None) -> Plan:
    """The plan of `cfg` on `devices` (default: all) or on a given mesh (and rules
    table, default cfg's). With `batches` (training, evaluation), a batch that does not
    split evenly over the batch axes is a ConfigError; inference passes False.
    `privacy`: DP-SGD's settings resolved against the data (train/privacy.py; the
    pre-flight and layout tools leave it out)."""
    if mesh is None:
        mesh = sharding.make_mesh(cfg.mesh.axes(), devices=devices, dcn=cfg.mesh.dcn())
    rules = rules if rules is not None else sharding.make_rules(cfg.sharding.rules,
                                                                mesh.axis_names)
    check_experts(cfg, mesh, rules)
    check_context(cfg, mesh, rules, batches)
    if batches:
        check_batches(cfg, mesh, rules)
    init = make_init(cfg, mesh, rules, privacy)
    abstract = jax.eval_shape(init, jax.random.key(cfg.train.seed))
    return Plan(cfg, mesh, rules, init, abstract, state_shardings(abstract, mesh, rules))


def build_state(cfg: Config, mesh: Mesh, rules: sharding.rules.Rules | None = None
                ) -> tuple[TrainState, Any]:
    """Sharded TrainState for `cfg` on `mesh`, and the shardings it was built with.

    Abstract first: eval_shape the init, resolve shardings from logical axes, then
    jit(init, out_shardings) so every array is created already distributed.
    """
    p = plan(cfg, mesh=mesh, rules=rules, batches=False)
    return init_state(p.init, p.shardings, cfg.train.seed), p.shardings
