"""Collective accounting on a hand-written HLO program, against hand-computed bytes."""

import re

from train.preflight.hlo_collectives import collectives, group_axes, shape_bytes, summarize

HLO = """HloModule m

%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = u32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %cp = f32[8]{0} collective-permute(%x), channel_id=3, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  ROOT %t = (s32[], f32[8]) tuple(%i, %cp)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = bf16[4,16]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,2]<=[4], dimensions={0}
  %w = (s32[], f32[8]) while(%p), condition=%cond.1, body=%inner_body
  ROOT %t = (s32[], f32[8]) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(%a), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add
  %ard = f32[8]{0} all-reduce-done(%ars)
  %loop = (s32[], f32[8]) while(%t0), condition=%cond.1, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[8]{0} copy(%ard)
}
"""
MESH = {"data": 2, "fsdp": 2, "model": 1}  # devices 0..3 = (data, fsdp) row-major


def test_bytes_and_trip_counts_by_hand():
    items, unknown = collectives(HLO, MESH)
    assert unknown == 0
    rows = {(r["op"], r["axes"]): (r["bytes_per_step"], r["executions"]) for r in summarize(items)}
    # all-reduce-done once: 8 fp32 = 32 B; groups {0,2},{1,3} differ in data
    assert rows[("all-reduce", "data")] == (32, 1)
    # all-gather in the 5-trip loop: 4 x 16 bf16 = 128 B, 5 times; groups {0,1},{2,3}: fsdp
    assert rows[("all-gather", "fsdp")] == (5 * 128, 5)
    # permute in a 3-trip loop inside the 5-trip loop: 32 B x 15; pairs (0,1), (2,3): fsdp
    assert rows[("collective-permute", "fsdp")] == (15 * 32, 15)


def test_shapes_and_named_groups():
    assert shape_bytes("(bf16[2,3]{1,0}, f32[4]{0:T(128)}, pred[])") == 12 + 16 + 1
    line = "x = f32[4] all-gather(y), replica_groups=mesh['data'=2,'fsdp'=2] {'data','fsdp'}"
    assert group_axes(line, MESH) == "data+fsdp"
    line = "x = f32[4] all-gather(y), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}"
    assert group_axes(line, MESH) == "fsdp"


CHAIN_HLO = """HloModule chain

%fused_start (param_0: bf16[2,8]) -> bf16[4,8] {
  %param_0 = bf16[2,8]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[4,8]{1,0} all-gather(%param_0), channel_id=7, replica_groups=[2,2]<=[4], dimensions={0}
}

%async_collective_fusion.1 (param_0.1: bf16[2,8]) -> bf16[4,8] {
  %param_0.1 = bf16[2,8]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[4,8]{1,0} all-gather(%param_0.1), channel_id=7, replica_groups=[2,2]<=[4], dimensions={0}
}

%fused_done (param_0.2: bf16[2,8]) -> bf16[4,8] {
  %param_0.2 = bf16[2,8]{1,0} parameter(0)
  ROOT %all-gather.3 = bf16[4,8]{1,0} all-gather(%param_0.2), channel_id=7, replica_groups=[2,2]<=[4], dimensions={0}
}

%inner (p: (s32[], bf16[2,8])) -> (s32[], bf16[2,8]) {
  %p = (s32[], bf16[2,8]) parameter(0)
  %x = bf16[2,8]{1,0} get-tuple-element(%p), index=1
  %fusion.9 = bf16[4,8]{1,0} fusion(%x), kind=kCustom, calls=%async_collective_fusion.1
  ROOT %t = (s32[], bf16[2,8]) tuple(%i, %x)
}

%body (p: (s32[], bf16[2,8])) -> (s32[], bf16[2,8]) {
  %p = (s32[], bf16[2,8]) parameter(0)
  %x = bf16[2,8]{1,0} get-tuple-element(%p), index=1
  %async-collective-start.1 = bf16[4,8]{1,0} fusion(%x), kind=kCustom, calls=%fused_start
  %w = (s32[], bf16[2,8]) while(%p), condition=%cond, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  %async-collective-done.1 = bf16[4,8]{1,0} fusion(%x), kind=kCustom, calls=%fused_done
  %other = bf16[4,8]{1,0} all-gather(%x), channel_id=8, replica_groups=[2,2]<=[4], dimensions={0}
  ROOT %t = (s32[], bf16[2,8]) tuple(%i, %x)
}

ENTRY %main (a: bf16[2,8]) -> bf16[2,8] {
  %a = bf16[2,8]{1,0} parameter(0)
  %loop = (s32[], bf16[2,8]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %r = bf16[2,8]{1,0} copy(%a)
}
"""


def test_async_collective_chain_counts_once():
    """A collective the TPU compiler split into start / continuation / done fusions (one
    channel id) is one transfer per trip of the loop holding its start, even when a
    continuation runs inside an inner loop; another channel is another transfer."""
    items, _ = collectives(CHAIN_HLO, MESH)
    rows = {(r["op"], r["axes"]): (r["bytes_per_step"], r["executions"]) for r in summarize(items)}
    # two distinct all-gathers (channels 7 and 8), 4 x 8 bf16 = 64 B each, 4 trips
    assert rows == {("all-gather", "fsdp"): (2 * 4 * 64, 2 * 4)}


def test_a_chain_whose_collectives_are_not_the_fusions_roots_counts_once():
    """On v5e the TPU compiler's chain fusions return a tuple (the collective's result
    with the start's buffers): the copies are still one transfer."""
    hlo = CHAIN_HLO
    for name in ("fused_start", "async_collective_fusion.1", "fused_done"):
        head, body = hlo.split(f"%{name} (", 1)
        body, tail = body.split("\n}\n", 1)
        body = body.replace("ROOT %all-gather", "%all-gather")
        gathered = re.search(r"%(all-gather\.\d+) =", body).group(1)
        body += f"\n  ROOT %root = (bf16[4,8], s32[2]) tuple(%{gathered}, %buffers)"
        hlo = f"{head}%{name} ({body}\n}}\n{tail}"
    items, _ = collectives(hlo, MESH)
    rows = {(r["op"], r["axes"]): (r["bytes_per_step"], r["executions"]) for r in summarize(items)}
    assert rows == {("all-gather", "fsdp"): (2 * 4 * 64, 2 * 4)}


def test_multiline_instruction_does_not_end_its_computation():
    """A Pallas/Mosaic kernel's backend_config spans lines, some starting with "}}"; the
    collectives after it in the same loop body still count with the loop's trip count."""
    hlo = HLO.replace(
        "  %w = (s32[], f32[8]) while(%p), condition=%cond.1, body=%inner_body\n",
        '  %k = f32[8]{0} custom-call(%x), custom_call_target="tpu_custom_call", '
        'backend_config={"custom_call_config": {"body": "x",\n'
        '"metadata":"{\\"block_q\\": 512\n'
        '}}, metadata={op_name="splash"}\n'
        "  %w = (s32[], f32[8]) while(%p), condition=%cond.1, body=%inner_body\n")
    items, unknown = collectives(hlo, MESH)
    rows = {(r["op"], r["axes"]): (r["bytes_per_step"], r["executions"]) for r in summarize(items)}
    assert rows[("collective-permute", "fsdp")] == (15 * 32, 15)
    assert unknown == 0


UNROLLED_HLO = """HloModule unrolled

%cond (p: (u32[], bf16[4])) -> pred[] {
  %p = (u32[], bf16[4]) parameter(0)
  %limit = u32[]{:T(128)} constant(16)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body2 (p: (u32[], bf16[4])) -> (u32[], bf16[4]) {
  %p = (u32[], bf16[4]) parameter(0)
  %two = u32[]{:T(128)} constant(2)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  %x = bf16[4]{0} get-tuple-element(%p), index=1
  %cp = bf16[4]{0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %next = u32[]{:T(128)} add(%i, %two)
  ROOT %t = (u32[], bf16[4]) tuple(%next, /*index=1*/%cp)
}

%body1 (p: (u32[], bf16[4])) -> (u32[], bf16[4]) {
  %p = (u32[], bf16[4]) parameter(0)
  %one = u32[]{:T(128)} constant(1)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  %x = bf16[4]{0} get-tuple-element(%p), index=1
  %ag = bf16[4]{0} all-gather(%x), channel_id=2, replica_groups=[2,2]<=[4], dimensions={0}
  %next = u32[]{:T(128)} add(%i, %one)
  ROOT %t = (u32[], bf16[4]) tuple(%next, %ag)
}

ENTRY %main (a: bf16[4]) -> bf16[4] {
  %a = bf16[4]{0} parameter(0)
  %zero = u32[]{:T(128)} constant(0)
  %ten = u32[]{:T(128)} constant(10)
  %t0 = (u32[], bf16[4]) tuple(%zero, %a)
  %t1 = (u32[], bf16[4]) tuple(%ten, %a)
  %w2 = (u32[], bf16[4]) while(%t0), condition=%cond, body=%body2
  %w1 = (u32[], bf16[4]) while(%t1), condition=%cond, body=%body1
  ROOT %r = bf16[4]{0} copy(%a)
}
"""


def test_trip_counts_of_loops_without_a_known_count():
    """The TPU compiler unrolls its windowed-einsum loops by two (`i += 2` while `i < 16`:
    8 trips, not 16) and leaves them without a known_trip_count; a loop may also start
    past zero (i = 10 while i < 16: 6 trips)."""
    items, unknown = collectives(UNROLLED_HLO, MESH)
    assert unknown == 0
    rows = {r["op"]: (r["bytes_per_step"], r["executions"]) for r in summarize(items)}
    assert rows["collective-permute"] == (8 * 8, 8)  # 4 bf16 = 8 B, 8 trips
    assert rows["all-gather"] == (6 * 8, 6)
