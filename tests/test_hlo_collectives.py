"""Collective accounting on a hand-written HLO program, against hand-computed bytes."""

from train.hlo_collectives import collectives, group_axes, shape_bytes, summarize

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
