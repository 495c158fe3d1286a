"""`python -m train.compile`: the train step compiled ahead of time for TPU topologies
(libtpu, no TPU needed) and for the local CPU devices; the collective report checked
against the parameter-size math."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from train.preflight import topology

from helpers import REPO, cli_env, run_cli

TINY = ["--config", "configs/tiny.yaml", "data.source=synthetic", "compile_cache_dir=null"]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


def report(tmp_path, *args, devices: int = 8) -> dict:
    out = tmp_path / "report.json"
    proc = run_cli(*TINY, *args, "--json", str(out), module="train.compile", devices=devices)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # no layout the partitioner can only reach by replicating a tensor
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def total(r: dict, op: str, axes: str | None = None) -> float:
    return sum(c["bytes_per_step"] for c in r["collectives"]
               if c["op"] == op and (axes is None or c["axes"] == axes))


def param_bytes(r: dict) -> int:
    return 4 * r["params"]  # fp32 parameters and gradients


@needs_libtpu
def test_preflight_for_a_tpu_slice(tmp_path):
    r, text = report(tmp_path, "--topology", "v5e:2x2", "model.dtype=bfloat16",
                     "--hlo", str(tmp_path / "step.hlo"))
    assert r["devices"] == 4
    assert r["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "expert": 1, "model": 1}
    assert r["hbm_per_chip"] == 16 * 1024 ** 3 and r["fits"] is True
    m = r["memory_per_chip"]
    assert m["total"] == m["arguments"] + m["outputs"] + m["temporaries"] > 0
    assert m["arguments"] >= param_bytes(r) * 3 / 4  # params + 2 Adam moments, over 4 chips
    # 6 N D (N without the tied embedding's lookup) plus attention
    assert r["flops_per_step"] > 6 * 0.9 * r["params"] * r["tokens_per_step"]
    assert 0 < r["xla_flops_per_chip"] < r["flops_per_chip"] * 4
    assert total(r, "all-gather", "fsdp") > 0
    assert "of 16.00 GiB per chip: fits" in text and "all-gather" in text
    # each layer's weights are cast to bf16 inside the layer loop: no bf16 copy of the
    # stacked (layers, ...) matrices is made before it and kept for the backward loop
    entry = (tmp_path / "step.hlo").read_text().split("\nENTRY ", 1)[1]
    stacked = re.findall(r"= (bf16\[4,\d+,\d+[\d,]*\])\S* convert\(", entry)
    assert stacked == [], stacked


@needs_libtpu
def test_preflight_for_two_slices(tmp_path):
    """Two v5e:2x2 slices: the program is compiled for 8 chips whose data axis runs
    across the slices (DCN) while fsdp stays within each slice (ICI)."""
    r, text = report(tmp_path, "--topology", "v5e:2x2", "--slices", "2", "mesh.data=2",
                     "mesh.dcn_data=2")
    assert r["devices"] == 8
    assert r["mesh"] == {"data": 2, "fsdp": 4, "context": 1, "expert": 1, "model": 1}
    assert "x 2 slices" in r["target"]
    assert r["dcn_axes"] == ["data"]
    assert "across slices (DCN): data; within each slice (ICI): fsdp, model" in text


@needs_libtpu
@pytest.mark.once
def test_two_preflights_at_once(tmp_path):
    """Two TPU pre-flights on one machine at the same time (a user's and CI's): both
    compile, neither fails on libtpu's lockfile."""
    procs = [subprocess.Popen([sys.executable, "-m", "train.compile", *TINY, "--topology",
                               "v5e:2x2", "--json", str(tmp_path / f"{i}.json")],
                              cwd=REPO, env=cli_env(8), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    first, second = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert first["memory_per_chip"] == second["memory_per_chip"]


@needs_libtpu
def test_a_step_that_does_not_fit_exits_1(tmp_path):
    proc = run_cli(*TINY, "--topology", "v5e:2x2", "train.batch_size=65536",
                   module="train.compile")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: the train step does not fit in v5e:2x2" in proc.stderr
    assert "mesh.fsdp" in proc.stderr


@pytest.mark.once
@pytest.mark.parametrize("remat,gathers", [("none", 1), ("full", 2)])
def test_fsdp_report_matches_parameter_math(tmp_path, remat, gathers):
    """FSDP (tiny.yaml computes in fp32): every weight is all-gathered once for the
    forward, kept for the backward without remat and gathered again with full remat
    (1 or 2 x parameter bytes per chip); gradients come back reduced (all-reduce:
    parameter bytes; reduce-scatter: parameter bytes / fsdp)."""
    r, _ = report(tmp_path, "mesh.data=1", "mesh.fsdp=8", "sharding.rules=fsdp",
                  f"model.remat={remat}")
    p = param_bytes(r)
    assert total(r, "all-gather", "fsdp") == pytest.approx(gathers * p, rel=0.1)
    reduced = total(r, "all-reduce", "fsdp") + 8 * total(r, "reduce-scatter", "fsdp")
    assert reduced == pytest.approx(p, rel=0.1)


@pytest.mark.once  # the other pre-flight tests run on both Pythons
def test_fsdp_tp_report_matches_parameter_and_activation_math(tmp_path):
    """FSDP 4 x TP 2, no remat, fp32: over fsdp each chip gathers and reduces only its
    tensor-parallel half of the weights (P / 2 each way); over model the activations
    (b x T x D fp32, b = B / fsdp) are all-reduced after each row-parallel matmul in the
    forward (attention output, MLP output: 2 per layer) and for the input gradient of
    each column-parallel matmul in the backward (q, k, v, gate, up: 5 per layer; XLA
    reduces each partial gradient before adding them), plus the head's input gradient.
    Nothing else of that size: no accidental resharding."""
    r, _ = report(tmp_path, "mesh.data=1", "mesh.fsdp=4", "mesh.model=2",
                  "sharding.rules=fsdp_tp", "model.remat=none")
    p = param_bytes(r)
    assert total(r, "all-gather", "fsdp") == pytest.approx(p / 2, rel=0.1)
    assert total(r, "all-reduce", "fsdp") + 4 * total(r, "reduce-scatter", "fsdp") == \
        pytest.approx(p / 2, rel=0.1)
    layers, d, batch, length = 4, 128, 16, 128  # configs/tiny.yaml
    activation = (batch // 4) * length * d * 4
    assert total(r, "all-reduce", "model") == pytest.approx(
        (7 * layers + 1) * activation, rel=0.05)
    assert total(r, "all-gather", "model") <= activation  # the embedding lookup's rows
    # with data parallelism too (2 x 2 x 2) the lookup is not replicated either
    report(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.model=2", "sharding.rules=fsdp_tp")


def test_moe_report_counts_the_expert_all_to_all(tmp_path):
    """tiny-moe (fp32, no remat) on fsdp=2 x expert=4: per MoE layer and chip, the padded
    dispatch sends each of the 4 peers a buffer for all its m = b T k (token, expert)
    pairs (b = B / 8 sequences): the tokens there and the results back (4 m D fp32 each,
    twice again in the backward pass), their routing weights (4 m fp32, and their
    gradients back) and the experts' ids (4 m int32, forward only)."""
    r, text = report(tmp_path, "--config", "configs/tiny-moe.yaml", "mesh.fsdp=2",
                     "mesh.expert=4", "model.remat=none")
    layers, d, peers, m = 4, 128, 4, (16 // 8) * 128 * 2
    expected = layers * (4 * peers * m * d * 4 + 3 * peers * m * 4)
    assert total(r, "all-to-all", "expert") == pytest.approx(expected, rel=0.01)
    assert "all-to-all          over expert" in text and "mesh data=1, fsdp=2, expert=4" in text


@pytest.mark.once
def test_data_parallel_report_is_one_gradient_all_reduce(tmp_path):
    r, _ = report(tmp_path, "mesh.data=8", "mesh.fsdp=1", "sharding.rules=dp")
    assert total(r, "all-reduce", "data") == pytest.approx(param_bytes(r), rel=0.1)
    assert total(r, "all-gather") == 0


def test_bad_topology_and_mismatched_mesh_are_one_line_errors():
    cases = [(["--topology", "v9-8"], "unknown TPU topology 'v9-8'; known: ")]
    if importlib.util.find_spec("libtpu") is not None:
        cases.append((["--topology", "v5e:2x2", "mesh.fsdp=8"], "needs 8 devices but 4"))
    for args, expected in cases:
        proc = run_cli(*TINY, *args, module="train.compile")
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert expected in errors[0]
        if "v9" in expected:
            assert "v5p-64" in errors[0] and "v5e-256" in errors[0]


@pytest.mark.parametrize("name, wrap", [
    # Cloud TPU's slices: v4/v5p tori when every dimension is a multiple of 4 (whole
    # cubes), meshes below; v5e/v6e rings along a dimension of the pod's full 16 chips
    ("v5e-256", (True, True, False)), ("v6e:8x16", (False, True, False)),
    ("v5e:8x8", (False, False, False)), ("v5e:2x2", (False, False, False)),
    ("v5p-128", (True, True, True)), ("v4:4x4x12", (True, True, True)),
    ("v5p-64", (False, False, False)), ("v4-8", (False, False, False)),
])
def test_topology_wraparound_links(name, wrap):
    assert topology.parse(name).wrap == wrap


@needs_libtpu
def test_topology_devices_carry_the_wraparound():
    """The described slice is the torus, not a mesh of the same shape (libtpu runs in a
    child process: it takes a machine-wide lock the other pre-flight tests need)."""
    code = """
from jax.experimental import topologies
from train.preflight import topology
def fingerprint(devs):
    from jax._src.lib import _jax
    return _jax.get_topology_for_devices(devs).fingerprint()
ours = fingerprint(topology.devices(topology.parse("v5e-256")))
for wrap in [(True, True, False), (False, False, False)]:
    print(ours == fingerprint(topologies.get_topology_desc("v5e:16x16", "tpu", wrap=wrap).devices))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "False"]
