"""python -m train.generate / train.eval / train.convert on a run, as a user runs them."""

import json
import re
import shutil

import numpy as np
import pytest

from train.config import load_config
from train.inference import find_tokenizer, load

from helpers import run_cli

MESH8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.model=2", "sharding.rules=fsdp_tp"]


def continuations(stdout: str) -> list[str]:
    """The text after each '--- i: ...' header line."""
    blocks = stdout.split("\n--- ")[1:] if not stdout.startswith("--- ") else \
        ("\n" + stdout).split("\n--- ")[1:]
    return [b.split("\n", 1)[1].rsplit("\nprefill ", 1)[0] for b in blocks]


def test_generate_on_a_mesh_equals_one_device(trained_run, tmp_path):
    (tmp_path / "prompts.txt").write_text("import os\\nimport sys\\n\n\n")  # "\n" escaped
    args = ["--checkpoint", str(trained_run), "--prompt", "def main(", "--prompts-file",
            str(tmp_path / "prompts.txt"), "--max-new-tokens", "24"]
    eight = run_cli(*args, *MESH8, module="train.generate")
    assert eight.returncode == 0, eight.stderr[-2000:]
    assert "prefill 30 tokens" in eight.stdout and "tokens/s) | decode 46 tokens" in eight.stdout
    one = run_cli(*args, "mesh.data=1", "mesh.fsdp=1", "mesh.model=1", module="train.generate",
                  devices=1)
    assert one.returncode == 0, one.stderr[-2000:]
    texts = continuations(eight.stdout)
    assert texts == continuations(one.stdout)
    assert texts[0].startswith("def main(") and texts[1].startswith("import os\nimport sys\n")
    assert len(texts[0].encode()) > len("def main(")


def test_eval_reproduces_the_runs_eval_loss(trained_run):
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    proc = run_cli("--checkpoint", str(trained_run), "mesh.data=8", "mesh.fsdp=1",
                   module="train.eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["batches"] == 2 and out["tokens"] == 2 * 8 * 32
    np.testing.assert_allclose(out["loss"], last["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(out["perplexity"], np.exp(last["eval_loss"]), rtol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "500"], "above the model's max_seq_len=256"),
    pytest.param(["model.num_layers=3"], "does not match the model: blocks/attn_norm_scale "
                 "has shape (2, 64)", marks=pytest.mark.once),
    pytest.param(["--temperature", "-1"], "--temperature must be >= 0", marks=pytest.mark.once),
])
def test_generate_bad_input_is_one_line(trained_run, args, message):
    proc = run_cli("--checkpoint", str(trained_run), "--prompt", "x", *args,
                   module="train.generate")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = run_cli("--checkpoint", str(tmp_path / "nope"), "--prompt", "x",
                   module="train.generate")
    assert proc.returncode == 1 and "does not exist" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    # a directory without a checkpoint: the message names the flag the user gave
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    proc = run_cli("--checkpoint", str(tmp_path / "empty"), "--prompt", "x",
                   module="train.generate")
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and line == (f"error: --checkpoint {str(tmp_path / 'empty')!r} "
                                             "holds no complete checkpoint"), proc.stderr


@pytest.mark.once
def test_a_damaged_checkpoint_config_or_array_is_one_line_naming_what_to_delete(
        trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ck = run / "checkpoints"
    steps = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    last, previous = steps[-1], steps[-2]
    (ck / str(last) / "config" / "metadata").write_text("{garbage")
    proc = run_cli("--checkpoint", str(run), "--prompt", "x", module="train.generate")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: the config saved with checkpoint step {last} in {ck} cannot be read "
        "(JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 "
        f"(char 1)); delete {ck}/{last} to fall back to step {previous}"], proc.stderr[-3000:]
    shutil.rmtree(ck / str(last))
    for f in (ck / str(previous) / "state").rglob("*"):  # arrays cut short
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run_cli("--checkpoint", str(run), "--prompt", "x", module="train.generate")
    lines = proc.stderr.strip().splitlines()
    # TensorStore's reader threads may log what they hit first: the line then points there
    expected = (f"error: checkpoint step {previous} in {ck} cannot be read (the arrays under "
                f"{ck}/{previous}/state are damaged or cut short); delete {ck}/{previous} to "
                f"fall back to step {steps[-3]}")
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert re.fullmatch(re.escape(expected) + r"(; details in /tmp/shardlm-\d+\.log)?",
                        lines[0]), proc.stderr[-3000:]


@pytest.mark.once
def test_a_run_on_bpe_data_generates_and_exports_with_its_tokenizer(bpe_run, tmp_path):
    """The run trained on a BPE-prepared directory (data.tokenizer at its default, byte)
    decodes with that BPE, and so does its export, written to a relative path."""
    run, tok_file = bpe_run
    user = load_config(None, ["compile_cache_dir=null"])
    assert find_tokenizer(load(str(run), user)).kind == "hf"
    proc = run_cli("--checkpoint", str(run), "--output", "exports/tiny", module="train.export",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    export = tmp_path / "exports" / "tiny"
    assert (export / "params").is_dir() and (export / "config.json").exists()
    assert (export / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]  # nothing half-written
    assert find_tokenizer(load(str(export), user)).kind == "hf"
    args = ["--prompt", "def f3(x):", "--max-new-tokens", "24", "compile_cache_dir=null"]
    from_export = run_cli("--checkpoint", str(export), *args, module="train.generate")
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    from_run = run_cli("--checkpoint", str(run), *args, module="train.generate")
    assert continuations(from_export.stdout) == continuations(from_run.stdout)
    # what it prints is the BPE's decoding of what it generated, not bytes
    assert "\ufffd" not in from_run.stdout
    bad = run_cli("--checkpoint", str(export), *args, "model.mlp_dim=256",
                  module="train.generate")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "does not match the model: blocks/w_gate has shape (2, 64, 128) in the checkpoint " \
           "and (2, 64, 256) in the model" in bad.stderr.strip().splitlines()[-1]
