"""Collectives in a compiled XLA program (its optimized HLO text), with bytes per step.

Each collective counts its result bytes (per device) times how often it runs in one
step: scanned layers appear once in the HLO, inside a while loop, so an op's count is
the product of the trip counts of the loops around it. Trip counts come from the loop's
`known_trip_count`, else from the loop itself (`i < N`, the step of i, its start).
Replica groups are mapped back to the mesh axes they span.

The TPU compiler splits one collective into a chain of fusions that overlap it with
compute (an async-collective-start, continuations, a done), each holding a copy of the
collective with the same channel id; a chain is one transfer, counted once, as often as
its start runs (continuations can sit inside an inner loop they overlap with). Only
collectives inside fusions chain (the fusion's root, or an element of its root tuple):
collectives written out in a computation are distinct even where they share a channel id.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

# ragged-all-to-all counts its result buffer (the most it may receive), an upper bound
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([\w\-]+)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")


@dataclasses.dataclass
class Collective:
    op: str  # all-gather, all-reduce, ...
    bytes_per_step: float  # result bytes per device, times executions per step
    executions: int  # per step
    axes: str  # mesh axes the groups span, e.g. "fsdp" or "data+fsdp"; "?" if unknown


def shape_bytes(type_text: str) -> float:
    """Bytes of an HLO result type: an array `bf16[4,128]{1,0}` or a tuple of them."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", type_text)):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{name: instruction lines} and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
        elif line.rstrip() == "}":  # not "}}, ...": a kernel's multi-line backend_config
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def _definition(lines: list[str], name: str) -> str:
    return next((ln for ln in lines if re.match(rf"\s*(?:ROOT\s+)?%?{re.escape(name)}\s*=", ln)),
                "")


def _operands(line: str, op: str) -> list[str]:
    m = re.search(rf"\s{op}\(([^)]*)\)", re.sub(r"/\*[^*]*\*/", "", line))
    return [a.strip().lstrip("%") for a in m.group(1).split(",")] if m else []


def _constant(lines: list[str], name: str) -> int | None:
    m = re.search(r"[su]\d+\[\]\S*\s+constant\((-?\d+)\)", _definition(lines, name))
    return int(m.group(1)) if m else None


def _tuple_index(lines: list[str], name: str) -> int | None:
    m = re.search(r"get-tuple-element\(.*\),\s*index=(\d+)", _definition(lines, name))
    return int(m.group(1)) if m else None


def trip_count(line: str, comps: dict[str, list[str]], caller: list[str] = ()) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count`, else read from the loop
    itself: `i < N` in its condition, `i + step` in its body (unrolled loops step by
    more than one) and i's initial value in the caller (0 when it is not a constant)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    cond_lines = comps.get(cond.group(1), []) if cond else []
    root = next((ln for ln in cond_lines if "ROOT" in ln and " compare(" in ln), "")
    if "direction=LT" not in root:
        return None
    lhs, rhs = (_operands(root, "compare") + ["", ""])[:2]
    limit, index = _constant(cond_lines, rhs), _tuple_index(cond_lines, lhs)
    if limit is None:
        return None
    body = re.search(r"body=%?([\w.\-]+)", line)
    body_lines = comps.get(body.group(1), []) if body else []
    out = next((ln for ln in body_lines if "ROOT" in ln and " tuple(" in ln), "")
    next_values = _operands(out, "tuple")
    init = _definition(caller, (_operands(line, "while") + [""])[0])
    init_values = _operands(init, "tuple") if " tuple(" in init else []
    step, start = 1, 0
    if index is not None and index < len(next_values):
        a, b = (_operands(_definition(body_lines, next_values[index]), "add") + ["", ""])[:2]
        if _tuple_index(body_lines, a) == index:
            step = max(_constant(body_lines, b) or 1, 1)
    if index is not None and index < len(init_values):
        start = _constant(caller, init_values[index]) or 0
    return max(0, -(-(limit - start) // step))


def multipliers(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], int]:
    """How often each computation runs per step; and how many loops had an unknown trip
    count (counted once)."""
    calls = collections.defaultdict(list)  # caller -> [(callee, factor)]
    unknown = 0
    for name, lines in comps.items():
        for line in lines:
            if re.search(r"\swhile\(", line):
                n = trip_count(line, comps, lines)
                unknown += n is None
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                calls[name].append((body, n or 1))
                continue
            if re.search(r"\s(async-done|async-update)\(", line):
                continue  # the same computation as its async-start
            for ref in re.findall(r"(?:calls|to_apply|true_computation|false_computation)="
                                  r"%?([\w.\-]+)", line):
                calls[name].append((ref, 1))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                calls[name] += [(r.strip().lstrip("%"), 1) for r in group.split(",")]
    mult = collections.Counter()

    def visit(name: str, factor: int, depth: int = 0) -> None:
        mult[name] += factor
        if depth < 64:
            for callee, n in calls.get(name, []):
                if callee in comps:
                    visit(callee, factor * n, depth + 1)

    visit(entry, 1)
    return dict(mult), unknown


def _iota_groups(text: str) -> np.ndarray | None:
    m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        return None
    out_shape = [int(x) for x in m.group(1).split(",")]
    ids = np.arange(math.prod(int(x) for x in m.group(2).split(","))).reshape(
        [int(x) for x in m.group(2).split(",")])
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(out_shape[0], -1)


def group_axes(line: str, mesh_shape: dict[str, int]) -> str:
    """The mesh axes a collective's replica groups (or permutation pairs) span."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if named:  # device ids laid out on XLA's own mesh; groups run along the named axes
        declared = re.findall(r"'([^']+)'=(\d+)", named.group(1))
        used = re.findall(r"'([^']+)'", named.group(2))
        axes = [a for a, _ in declared]
        if not declared or any(a not in axes for a in used):
            return "?"
        ids = np.arange(math.prod(int(n) for _, n in declared)).reshape(
            [int(n) for _, n in declared])
        order = [axes.index(a) for a in axes if a not in used] + [axes.index(a) for a in used]
        groups = ids.transpose(order).reshape(-1, math.prod(int(dict(declared)[a])
                                                            for a in used))
        return _varying(groups, mesh_shape)
    groups = None
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", line)
    if m:
        groups = _iota_groups(m.group(1))
    else:
        m = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{}]*\})\}", line)
        if m:
            groups = [[int(x) for x in g.split(",") if x]
                      for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    if groups is None:
        return "?"
    return _varying(groups, mesh_shape)


def _varying(groups, mesh_shape: dict[str, int]) -> str:
    """Mesh axes along which the device ids of some group differ (partition id p is
    mesh position p in row-major order)."""
    names = list(mesh_shape)
    shape = [mesh_shape[a] for a in names]
    size = math.prod(shape)
    varying = set()
    for group in groups:
        coords = [np.unravel_index(int(i), shape) for i in group if int(i) < size]
        for k, a in enumerate(names):
            if len({c[k] for c in coords}) > 1:
                varying.add(a)
    return "+".join(a for a in names if a in varying) or "none"


def collectives(hlo: str, mesh_shape: dict[str, int]) -> tuple[list[Collective], int]:
    """Every collective of the program with its bytes per step, and the number of loops
    whose trip count could not be read (their bodies are counted once)."""
    comps, entry = computations(hlo)
    mult, unknown = multipliers(comps, entry)
    fused = {ref for lines in comps.values() for line in lines if re.search(r"\sfusion\(", line)
             for ref in re.findall(r"calls=%?([\w.\-]+)", line)}
    out, chains = [], {}  # (op, channel id) -> index in out
    for name, lines in comps.items():
        runs = mult.get(name, 0)
        if not runs:
            continue
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            type_text, op = m.groups()
            base = op[:-5] if op.endswith("-done") else op
            if base not in COLLECTIVES or op.endswith("-start"):
                continue
            start_line = line
            if op.endswith("-done"):  # groups are on the matching -start
                operand = re.search(rf"{re.escape(op)}\(%?([\w.\-]+)", line)
                start_line = next((ln for ln in lines if operand and
                                   re.match(rf"\s*%?{re.escape(operand.group(1))}\s*=", ln)),
                                  line)
            item = Collective(base, shape_bytes(type_text) * runs, runs,
                              group_axes(start_line, mesh_shape))
            # a chain's copies each sit in a fusion (its root, or in its root tuple with
            # the start's buffers, as on v5e); collectives written out in a loop body are
            # distinct even where they share a channel id (XLA:CPU gives every shard_map
            # collective channel 1)
            channel = re.search(r"channel_id=(\d+)", line)
            chained = channel and name in fused
            key = (base, channel.group(1)) if chained else None
            if key is None or key not in chains:
                if key is not None:
                    chains[key] = len(out)
                out.append(item)
            elif item.executions < out[chains[key]].executions:
                # parts of one chain: continuations may sit in an inner loop (overlapping
                # its compute); the transfer runs as often as its start
                out[chains[key]] = item
    return out, unknown


def summarize(items: list[Collective]) -> list[dict]:
    """Totals per (op, axes), largest first."""
    table = collections.defaultdict(lambda: [0.0, 0])
    for c in items:
        table[(c.op, c.axes)][0] += c.bytes_per_step
        table[(c.op, c.axes)][1] += c.executions
    rows = [{"op": op, "axes": axes, "bytes_per_step": b, "executions": n}
            for (op, axes), (b, n) in table.items()]
    return sorted(rows, key=lambda r: -r["bytes_per_step"])
