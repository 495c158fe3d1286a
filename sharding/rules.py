"""The rules table: logical axis name -> mesh axes.

Parameters and activations carry logical names (e.g. ("embed", "mlp")); a rules table
maps each name to zero or more mesh axes. A new parallelism strategy is a new table,
not new code. Parameter names and activation names are disjoint ("embed" vs
"act_embed") so FSDP can shard a weight's embed dimension over `fsdp` while the
activations' batch dimension uses the same mesh axis.
"""

from __future__ import annotations

from typing import Mapping

from sharding.errors import ShardingError

MeshAxes = tuple[str, ...]
Rules = dict[str, MeshAxes]

# Every logical name the rules must cover. An unknown name is an error, never a silent
# replication.
# "vector": the d_model axis of 1-D per-layer parameters (norm scales, GPT-2's output
# biases), replicated by every preset: sharding a few KB saves nothing and costs one
# collective per use (docs/benchmarks.md has what that cost the tiny Llama).
# "lora": the rank of LoRA adapters (a few dozen), replicated by every preset; the
# adapters' other axes are those of the weight they adapt.
# "experts": the expert dimension of MoE weights; "expert_embed": their d_model axis,
# which cannot take the `expert` mesh axis the experts already use (the other weights'
# "embed" may: expert ways FSDP-shard attention rather than replicate it).
PARAM_NAMES = ("layers", "vocab", "embed", "vector", "mlp", "heads", "kv_heads", "head_dim",
               "length", "experts", "expert_embed", "lora")
ACTIVATION_NAMES = ("batch", "act_length", "act_embed", "act_mlp", "act_heads",
                    "act_kv_heads", "act_vocab", "act_ids", "rows_embed")

_BATCH = {"batch": ("data", "fsdp")}
_FSDP = {"embed": ("fsdp",), "expert_embed": ("fsdp",)}
# Expert parallelism as MaxText lays it out: experts split over `expert`, which also
# splits the batch and FSDP-shards every non-expert weight.
_EP = {"batch": ("data", "fsdp", "expert"), "embed": ("fsdp", "expert"),
       "expert_embed": ("fsdp",), "experts": ("expert",)}
_TP = {
    "mlp": ("model",), "heads": ("model",), "kv_heads": ("model",), "vocab": ("model",),
    "act_mlp": ("model",), "act_heads": ("model",), "act_kv_heads": ("model",),
    "act_vocab": ("model",),
}

# Context parallelism as MaxText and torchtitan lay it out: the activations' length split
# over `context`, whose ways also FSDP-shard the parameters (gradients are reduced over
# fsdp x context), so context ways never replicate a weight.
_CP = {"embed": ("fsdp", "context"), "expert_embed": ("fsdp", "context"),
       "act_length": ("context",)}

# dp: replicate parameters, split the batch.
# fsdp: also shard every parameter's embed dimension over `fsdp` (ZeRO-3 style:
#       weights are all-gathered per layer, gradients reduce-scattered).
# tp: shard heads / mlp / vocab over `model` (Megatron-style tensor parallel).
# fsdp_tp: both.
# fsdp_ep, fsdp_tp_ep: fsdp / fsdp_tp with MoE experts split over `expert`.
# fsdp_cp, fsdp_tp_cp: fsdp / fsdp_tp with sequences split over `context`.
PRESETS: dict[str, dict[str, MeshAxes]] = {
    "dp": {**_BATCH},
    "fsdp": {**_BATCH, **_FSDP},
    "tp": {**_BATCH, **_TP},
    "fsdp_tp": {**_BATCH, **_FSDP, **_TP},
    "fsdp_ep": {**_FSDP, **_EP},
    "fsdp_tp_ep": {**_FSDP, **_EP, **_TP},
    "fsdp_cp": {**_BATCH, **_CP},
    "fsdp_tp_cp": {**_BATCH, **_CP, **_TP},
}


def ids_axes(rules: Rules) -> MeshAxes:
    """The derived rule for "act_ids", the batch dimension of the token ids where the
    embedding's backward pass scatter-adds its cotangent rows (laid out with D as the
    table's): the batch's mesh axes, unless the table's embed dimension takes one of them
    (FSDP), where the rows cannot keep the batch layout and the ids (small ints) are
    replicated to meet them instead."""
    if set(rules["batch"]) & set(rules["embed"]):
        return ()
    return rules["batch"]


def rows_embed_axes(rules: Rules) -> MeshAxes:
    """The derived rule for "rows_embed", the d_model axis of rows looked up in an
    embedding table on their way from the table's layout to the activations': the
    table's "embed" axes less those the length takes (context parallelism), so the rows
    reach the (batch, length) layout by all-to-alls."""
    return tuple(a for a in rules["embed"] if a not in rules["act_length"])


class RulesError(ShardingError):
    """A rules table that does not fit the logical names or the mesh."""


def _as_axes(value: object, name: str) -> MeshAxes:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RulesError(f"rule for {name!r} must be null, a mesh axis or a list of mesh axes, "
                     f"got {value!r}")


def make_rules(spec: str | Mapping[str, object], mesh_axes: tuple[str, ...]) -> Rules:
    """A complete rules table from a preset name or a mapping.

    A mapping may name a preset under the key "preset" and override single names;
    names it leaves out are replicated (mapped to no mesh axis).
    """
    if isinstance(spec, str):
        spec = {"preset": spec}
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise RulesError(f"unknown rules preset {preset!r}; known: {', '.join(PRESETS)}")
    known = set(PARAM_NAMES) | set(ACTIVATION_NAMES)
    rules: Rules = {name: () for name in known}
    rules.update(PRESETS.get(preset, {}))
    for name, value in spec.items():
        if name not in known:
            raise RulesError(f"rules name unknown logical axis {name!r}; known: "
                             f"{', '.join(sorted(known))}")
        rules[name] = _as_axes(value, name)
    if "act_ids" not in spec:
        rules["act_ids"] = ids_axes(rules)
    if "rows_embed" not in spec:
        rules["rows_embed"] = rows_embed_axes(rules)
    for name, axes in rules.items():
        for axis in axes:
            if axis not in mesh_axes:
                raise RulesError(f"rule {name!r} -> {axis!r}: no such mesh axis "
                                 f"(mesh axes: {', '.join(mesh_axes)})")
    return rules
