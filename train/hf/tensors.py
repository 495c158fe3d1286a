"""Hugging Face safetensors files <-> our parameters, for any model family (the names
and layouts come from the family's `mapping`).

Import builds each parameter straight onto the mesh (jax.make_array_from_callback:
every device receives only its shard), one parameter at a time, reading the layers'
tensors from the safetensors files (memory-mapped) on the host. Export gathers one
parameter at a time and writes safetensors shards that `transformers` loads. The
vocabulary is padded to a multiple of 128 (zero rows, never generated) and unpadded on
export.

Our layers sit in two stacks: a mixture-of-experts model keeps its first dense layers
in blocks/ and the rest in moe_blocks/ (a dense model: all in blocks/), so an HF name
with {l} covers the layers of the stack its parameter is in; one with {e} is one
expert's tensor, stacked over the experts.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from train.errors import ConversionError

# One entry per parameter of ours: (HF name, with {l} for the layer and {e} for the
# expert; to_ours(hf array, model config) -> our array of that layer (and expert);
# to_hf(ours, model config) -> hf array, or None when the family's joined_tensors writes
# it, or when the entry is for import only). A list of entries: the layouts a
# parameter may come in, imported from the first one the checkpoint has, exported in the
# first. Vocabulary padding is handled here, on the "vocab" axis.
Entry = tuple[str, Callable, Callable | None]
Mapping = dict[str, Entry | list[Entry]]
VOCAB_AXIS = {"embedding": 0, "head": 1}  # where our vocabulary-sized parameters pad


def same(x, m):
    return x


def transposed(x, m):
    return x.T


class Tensors:
    """The tensors of an HF directory's safetensors file(s), read lazily (memory-mapped).
    GPT-2 names may carry a "transformer." prefix or not."""

    def __init__(self, directory: str):
        d = epath.Path(directory)
        index = d / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (d / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            found = ", ".join(sorted(p.name for p in d.iterdir())[:8])
            raise ConversionError(
                f"{directory} has no model.safetensors (or index); found: {found or 'nothing'}"
                " (PyTorch .bin files: load and save them with transformers' "
                "save_pretrained(safe_serialization=True))")
        self.where: dict[str, tuple[object, str]] = {}
        self.handles = [safe_open(str(d / f), framework="np") for f in files]
        for h in self.handles:
            for key in h.keys():
                self.where[key] = (h, key)
                if key.startswith("transformer."):
                    self.where.setdefault(key[len("transformer."):], (h, key))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ConversionError(f"the checkpoint has no tensor {name!r}")
        handle, key = self.where[name]
        return handle.get_tensor(key)


def load_params(directory: str, m, table: Mapping, target) -> nnx.State:
    """Our parameters from the HF directory, named by `table` (the family's mapping),
    each array built on its target sharding and dtype (`target`: the abstract params
    state, ShapeDtypeStructs with shardings)."""
    tensors = Tensors(directory)
    flat = []
    for path, var in nnx.to_flat_state(target):
        name = "/".join(map(str, path))
        if name not in table:
            raise ConversionError(f"no Hugging Face tensor maps to our parameter {name}")
        layers = _layers(name, m)
        hf_name, to_ours, _ = _layout(tensors, table[name], layers)
        spec = var.get_value()
        if "{l}" in hf_name:
            host = np.stack([_read(tensors, hf_name, to_ours, m, l=i) for i in layers])
        else:
            host = _read(tensors, hf_name, to_ours, m)
        if name in VOCAB_AXIS:
            host = _pad(host, VOCAB_AXIS[name], spec.shape[VOCAB_AXIS[name]])
        if host.shape != spec.shape:
            raise ConversionError(f"{hf_name} gives shape {host.shape} for our {name}, "
                                  f"expected {spec.shape}")
        host = np.asarray(host, dtype=spec.dtype)
        value = jax.make_array_from_callback(spec.shape, spec.sharding,
                                             lambda i, host=host: host[i])
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


def _read(tensors: Tensors, hf_name: str, to_ours: Callable, m, **layer) -> np.ndarray:
    """One HF tensor as ours, or with {e} in its name every expert's, stacked."""
    if "{e}" in hf_name:
        return np.stack([to_ours(tensors.get(hf_name.format(e=e, **layer)), m)
                         for e in range(m.moe.num_experts)])
    return to_ours(tensors.get(hf_name.format(**layer)), m)


def _layers(name: str, m) -> range:
    """The model layers our stacked parameter `name` holds: blocks/ the dense layers
    first, moe_blocks/ the mixture-of-experts layers after them."""
    dense = m.num_layers - m.moe_layers
    return range(dense, m.num_layers) if name.startswith("moe_blocks/") else range(dense)


def _entries(entry: Entry | list[Entry]) -> list[Entry]:
    return entry if isinstance(entry, list) else [entry]


def _layout(tensors: Tensors, entry: Entry | list[Entry], layers: range) -> Entry:
    """The first of a parameter's layouts whose (first layer's, first expert's) tensor
    the checkpoint holds; a single layout as it is (a missing tensor is named when read)."""
    options = _entries(entry)
    if len(options) == 1:
        return options[0]
    names = [hf_name.format(l=layers.start, e=0) for hf_name, _, _ in options]
    for option, name in zip(options, names):
        if name in tensors:
            return option
    raise ConversionError(f"the checkpoint has none of the tensors {', '.join(names)}")


def _pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    if x.shape[axis] > size:
        raise ConversionError(f"vocabulary of {x.shape[axis]} does not fit "
                              f"model.vocab_size={size}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)


def export_tensors(m, family, params, vocab_size: int) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) pairs of our params (an nnx.State), gathered to the host one
    parameter at a time (the family's joined tensors last), vocabulary unpadded to
    `vocab_size`."""

    def gather(name):
        node = params
        for key in name.split("/"):
            node = node[key]
        x = np.asarray(multihost_utils.process_allgather(node.get_value(), tiled=True))
        if name in VOCAB_AXIS:
            x = np.take(x, np.arange(vocab_size), axis=VOCAB_AXIS[name])
        return x

    table = family.mapping(m)
    for path, _ in nnx.to_flat_state(params):
        name = "/".join(map(str, path))
        hf_name, _, to_hf = _entries(table[name])[0]
        if to_hf is None:
            continue
        x = gather(name)
        if "{l}" not in hf_name:
            yield hf_name, to_hf(x, m)
            continue
        for i, layer in enumerate(_layers(name, m)):
            if "{e}" not in hf_name:
                yield hf_name.format(l=layer), to_hf(x[i], m)
                continue
            for e in range(x.shape[1]):
                yield hf_name.format(l=layer, e=e), to_hf(x[i, e], m)
    yield from family.joined_tensors(m, gather)


def write_safetensors(directory: str, tensors: Iterator[tuple[str, np.ndarray]],
                      max_shard_bytes: int = 4 << 30) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards (each written as
    soon as it is full) plus the index transformers reads."""
    d = epath.Path(directory)
    written: list[tuple[str, list[str], int]] = []  # (temporary file, names, bytes)
    current: dict[str, np.ndarray] = {}

    def flush():
        tmp = f".shard-{len(written)}.safetensors"
        save_file(current, str(d / tmp), metadata={"format": "pt"})
        written.append((tmp, list(current), sum(x.nbytes for x in current.values())))
        current.clear()

    for name, x in tensors:
        x = np.ascontiguousarray(x)
        if current and sum(v.nbytes for v in current.values()) + x.nbytes > max_shard_bytes:
            flush()
        current[name] = x
    flush()
    if len(written) == 1:
        (d / written[0][0]).rename(d / "model.safetensors")
        return ["model.safetensors"]
    weight_map, names = {}, []
    for i, (tmp, keys, _) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (d / tmp).rename(d / fname)
        weight_map.update({k: fname for k in keys})
        names.append(fname)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(w[2] for w in written)}, "weight_map": weight_map},
        indent=1))
    return names
