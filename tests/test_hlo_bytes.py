"""Bytes on the wire from compiled HLO (training/hlo_bytes.py): collectives of known shapes under
`jax.shard_map` on 8 fake CPU devices give exactly the analytic bytes, the printed forms of replica
groups and async collectives parse, and the AC-SGD hand-off sends exactly its packed codes + scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from training import acsgd
from training.hlo_bytes import KINDS, collective_bytes, group_size, summary


def _mesh(shape, names):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def _hlo(fn, *args, mesh, in_specs, out_specs) -> str:
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))
    return f.lower(*args).compile().as_text()


def _only(result: dict, kind: str) -> None:
    """No collective of another kind in the program."""
    assert {k: n for k, n in result["ops"].items() if n} == {kind: result["ops"][kind]}, result["ops"]


def test_psum_all_gather_ppermute_bytes():
    mesh = _mesh((8,), ("d",))
    x = np.ones((8 * 16, 4), np.float32)  # [16, 4] f32 = 256 bytes per device
    r = collective_bytes(_hlo(lambda v: jax.lax.psum(v, "d"), x, mesh=mesh, in_specs=P("d"), out_specs=P()))
    _only(r, "all-reduce")
    assert r["ops"]["all-reduce"] == 1 and r["payload_bytes"]["all-reduce"] == 256
    assert r["wire_bytes"]["all-reduce"] == pytest.approx(2 * 7 / 8 * 256)
    assert r["collectives"][0]["group_size"] == 8

    x = np.ones((8 * 4, 8), np.float32)  # [4, 8] per device, gathered to [32, 8] = 1024 bytes
    gather = lambda v: jax.lax.all_gather(v, "d", tiled=True)  # noqa: E731
    r = collective_bytes(_hlo(gather, x, mesh=mesh, in_specs=P("d"), out_specs=P("d")))  # still varying
    _only(r, "all-gather")
    assert r["payload_bytes"]["all-gather"] == 1024
    assert r["wire_bytes"]["all-gather"] == pytest.approx(7 / 8 * 1024)

    x = np.ones((8 * 5, 3), np.float32)  # [5, 3] f32 = 60 bytes per device
    perm = [(i, (i + 1) % 8) for i in range(8)]
    r = collective_bytes(_hlo(lambda v: jax.lax.ppermute(v, "d", perm), x, mesh=mesh,
                              in_specs=P("d"), out_specs=P("d")))
    _only(r, "collective-permute")
    assert r["ops"]["collective-permute"] == 1
    assert r["payload_bytes"]["collective-permute"] == r["wire_bytes"]["collective-permute"] == 60
    assert r["total_payload_bytes"] == 60 and "collective-permute" in summary(r)


def test_psum_over_one_axis_of_a_2d_mesh():
    mesh = _mesh((2, 4), ("a", "b"))
    x = np.ones((2 * 3, 4 * 8), np.float32)  # [3, 8] f32 = 96 bytes per device
    r = collective_bytes(_hlo(lambda v: jax.lax.psum(v, "b"), x, mesh=mesh, in_specs=P("a", "b"),
                              out_specs=P("a")))
    _only(r, "all-reduce")
    assert r["collectives"][0]["group_size"] == 4
    assert r["payload_bytes"]["all-reduce"] == 96
    assert r["wire_bytes"]["all-reduce"] == pytest.approx(2 * 3 / 4 * 96)


_MODULE = """HloModule jit_f, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[8]{0}}, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = f32[16]{0} get-tuple-element(%p), index=1
  %cp = f32[16]{0} collective-permute(f32[16]{0} %v), channel_id=3, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[16]{0}) tuple(%i, %cp)
}

%cond (q: (s32[], f32[16])) -> pred[] {
  %q = (s32[], f32[16]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (x: f32[8], y: bf16[4,2]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %y = bf16[4,2]{1,0} parameter(1)
  %ar = (f32[8]{0}, /*index=1*/bf16[4,2]{1,0}) all-reduce(%x, %y), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %ag-start = (f32[8]{0}, f32[32]{0}) all-gather-start(%x), channel_id=2, replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={0}, use_global_device_ids=true
  %ag-done = f32[32]{0} all-gather-done((f32[8]{0}, f32[32]{0}) %ag-start)
  %rs = f32[2]{0} reduce-scatter(%x), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%x), channel_id=5, source_target_pairs={{0,1}}
  %cpd = f32[8]{0} collective-permute-done(%cps), metadata={op_name="cps"}
  %zero = s32[] constant(0)
  %init = (s32[], f32[16]{0}) tuple(%zero, %v0)
  %w = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %a2a = f32[8]{0} all-to-all(%x), channel_id=6, replica_groups={}, dimensions={0}
  ROOT %out = f32[8]{0} add(%cpd, %a2a)
}
"""


def test_printed_forms_async_and_loops():
    r = collective_bytes(_MODULE)
    assert r["ops"] == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "collective-permute": 2,
                        "all-to-all": 1}
    assert r["payload_bytes"] == {"all-reduce": 8 * 4 + 8 * 2, "all-gather": 128, "reduce-scatter": 8,
                                  "collective-permute": 32 + 5 * 64, "all-to-all": 32}
    assert r["executions"]["collective-permute"] == 6
    assert r["wire_bytes"]["all-reduce"] == pytest.approx(2 * 3 / 4 * 48)  # groups of 4
    assert r["wire_bytes"]["all-gather"] == pytest.approx(3 / 4 * 128)  # the mesh axis 'b' = 4
    assert r["wire_bytes"]["reduce-scatter"] == pytest.approx(3 * 8)
    assert r["wire_bytes"]["all-to-all"] == pytest.approx(7 / 8 * 32)  # {}: all 8 partitions
    assert r["wire_bytes"]["collective-permute"] == 32 + 5 * 64
    assert r["unknown_trip_count"] == []
    assert r["total_payload_bytes"] == sum(r["payload_bytes"][k] for k in KINDS)

    unknown = collective_bytes(_MODULE.replace(', backend_config={"known_trip_count":{"n":"5"}}', ""))
    assert unknown["unknown_trip_count"] == ["cp"]
    assert unknown["payload_bytes"]["collective-permute"] == 32 + 64


def test_group_size_forms():
    assert group_size("x), replica_groups={{0,1},{2,3}}, dimensions={0}", 8) == 2
    assert group_size("x), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add", 8) == 2
    assert group_size("x), replica_groups=mesh['x'=2,'y'=4] {'x','y'}, dimensions={0}", 1) == 8
    assert group_size("x), replica_groups=mesh['x'=2,'y'=4] {'x'}", 1) == 2
    assert group_size("x), replica_groups={}, to_apply=%add", 8) == 8
    assert group_size("x), to_apply=%add", 4) == 4


# --- the AC-SGD hand-off ------------------------------------------------------------------------

S, MB, T, D = 4, 2, 8, 16
PERM = [(s, (s + 1) % S) for s in range(S)]


def _handoff_program(mesh, **kw):
    spec = P("stage")
    return jax.shard_map(lambda x, ms, mr: acsgd.handoff(x, ms, mr, axis_name="stage", perm=PERM, **kw),
                         mesh=mesh, in_specs=spec, out_specs=spec)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_handoff_sends_packed_codes_and_scales(bits):
    mesh = _mesh((S,), ("stage",))
    x = np.ones((S * MB, T, D), np.float32)
    r = collective_bytes(jax.jit(_handoff_program(mesh, fwd_bits=bits)).lower(x, x, x).compile().as_text())
    _only(r, "collective-permute")
    assert r["payload_bytes"]["collective-permute"] == acsgd.message_bytes((MB, T, D), bits)
    assert r["payload_bytes"]["collective-permute"] == MB * T * D * bits // 8 + D * 4
    assert sorted(s for c in r["collectives"] for s in c["shapes"]) == \
        sorted([f"u8[{MB},{T},{D * bits // 8}]", f"f32[{D}]"])

    r = collective_bytes(jax.jit(_handoff_program(mesh, exact=True)).lower(x, x, x).compile().as_text())
    assert r["payload_bytes"]["collective-permute"] == MB * T * D * 4  # the float array itself


@pytest.mark.parametrize("bwd_bits", [8, None])
def test_handoff_gradient_sends_8_bit_codes_back(bwd_bits):
    mesh = _mesh((S,), ("stage",))
    x = np.ones((S * MB, T, D), np.float32)
    program = _handoff_program(mesh, fwd_bits=4, bwd_bits=bwd_bits)

    def loss(v, ms, mr):
        return jnp.sum(program(v, ms, mr)[0] ** 2)

    hlo = jax.jit(jax.value_and_grad(loss)).lower(x, x, x).compile().as_text()
    r = collective_bytes(hlo)
    forward = acsgd.message_bytes((MB, T, D), 4)
    backward = acsgd.message_bytes((MB, T, D), bwd_bits)
    assert r["payload_bytes"]["collective-permute"] == forward + backward
    shapes = sorted(s for c in r["collectives"] if c["kind"] == "collective-permute" for s in c["shapes"])
    expected_back = [f"u8[{MB},{T},{D}]", f"f32[{D}]"] if bwd_bits else [f"f32[{MB},{T},{D}]"]
    assert shapes == sorted([f"u8[{MB},{T},{D // 2}]", f"f32[{D}]", *expected_back])
