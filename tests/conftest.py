"""Test set-up: 8 fake CPU devices, configured before JAX initializes its backend."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile far more than they compute: without LLVM's optimizations XLA:CPU
# compiles about a quarter faster (the suite's programs are tiny; each result is compared
# with another computed under the same flags). Subprocesses inherit it (helpers.cli_env);
# the product's own CPU setting (train/startup.py) is what test_step checks against it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from helpers import run_cli, save_small_hf  # noqa: E402

# Tests of the command-line tools' surface (arguments, messages, files): the same Python
# on either version, so CI's second Python leaves them to the first.
TOOL_MODULES = {"test_cli.py", "test_inference_cli.py", "test_data_sources.py",
                "test_metrics.py", "test_layout_tool.py", "test_loop.py", "test_lock.py",
                "test_serve.py"}


def pytest_collection_modifyitems(config, items):
    """SHARDLM_TESTS=core (CI's second Python) skips the tests marked `once` and the
    tool-surface modules (TOOL_MODULES), and runs only the first case of each
    parametrized test (the matrices run in the first)."""
    if os.environ.get("SHARDLM_TESTS") != "core":
        return
    skip = pytest.mark.skip(reason="marked once: CI runs it in its Python 3.11 suite")
    tools = pytest.mark.skip(reason="a tool-surface test: CI runs it in its Python 3.11 suite")
    matrix = pytest.mark.skip(reason="a further case of a test matrix: CI runs the matrix "
                              "in its Python 3.11 suite")
    seen = set()
    for item in items:
        if "once" in item.keywords:
            item.add_marker(skip)
        elif item.path.name in TOOL_MODULES:
            item.add_marker(tools)
        elif hasattr(item, "callspec"):
            key = (item.path, item.originalname)
            if key in seen:
                item.add_marker(matrix)
            seen.add(key)


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests need 8 fake CPU devices (see conftest.py)"
    return jax.devices()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Per-step losses of the uninterrupted run that resumed runs must reproduce."""
    from runs import RUN, STEPS, losses
    out = tmp_path_factory.mktemp("reference")
    proc = run_cli(*RUN, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = losses(out)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory):
    """The tiny MoE trained by `python -m train` on an fsdp x expert mesh of 8 devices: its
    output directory (metrics.jsonl, tensorboard/)."""
    from runs import MOE_RUN
    out = tmp_path_factory.mktemp("moe") / "run"
    proc = run_cli(*MOE_RUN, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A short run of the tiny Llama on the stdlib bytes (2x2x2 mesh), checkpointed and
    evaluated at its last step: what generation, evaluation and export read."""
    from runs import RUN, STEPS
    out = tmp_path_factory.mktemp("trained")
    proc = run_cli(*RUN, f"output_dir={out}", f"eval.every_steps={STEPS}", "eval.batches=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory):
    """The README's "Your own data" flow: a byte-level BPE trained on some text, the text
    prepared with it (data.tokenizer left at its default, byte), and a short run of the
    tiny Llama on that directory. Returns (run directory, tokenizer.json)."""
    from train.data.prepared import prepare
    from train.data.tokenizer import train_bpe
    root = tmp_path_factory.mktemp("bpe")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    (root / "corpus").mkdir()
    for i in range(0, 400, 40):
        (root / "corpus" / f"part{i}.txt").write_text("\n".join(texts[i:i + 40]))
    train_bpe(texts, 300, str(root / "tok.json"))
    prepare(str(root / "corpus"), root / "prepared", str(root / "tok.json"), progress=False,
            val_fraction=0.2, log=lambda line: None)
    out = root / "run"
    proc = run_cli("--config", "configs/tiny.yaml", f"data.path={root / 'prepared'}",
                   f"output_dir={out}", "train.steps=4", "train.batch_size=8",
                   "train.seq_len=32", "model.num_layers=2", "model.d_model=64",
                   "model.mlp_dim=128", "compile_cache_dir=null", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, root / "tok.json"


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
    """The tiny Llama fine-tuned by `python -m train` on chat JSONL (Qwen2.5's template,
    a BPE tokenizer): user turns of random words, every reply "Thanks, noted.". Returns
    (run directory, the run's output)."""
    from chat_templates import TEMPLATES, write_tokenizer
    root = tmp_path_factory.mktemp("chat")
    tokenizer = write_tokenizer(root / "tok", TEMPLATES["qwen2.5"])
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "zeta", "kappa", "sigma"]
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words, 12))},
                          {"role": "assistant", "content": "Thanks, noted."}]}
            for _ in range(400)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = root / "run"
    proc = run_cli("--config", "configs/tiny.yaml", f"data.path={root / 'chat.jsonl'}",
                   f"data.tokenizer={tokenizer}", f"data.cache_dir={root}/c",
                   "model.vocab_size=512", "train.seq_len=128", "train.batch_size=16",
                   "train.steps=60", "train.log_every=10", "optimizer.lr=3e-3",
                   "optimizer.warmup_steps=5", "model.num_layers=2", "compile_cache_dir=null",
                   f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def run8(tmp_path_factory):
    """The checkpoint tests' run stopped at step 8 (checkpoints 4 and 8), as `runs.RUN`
    trains it; tests that change it work on a copy (`copy_run`)."""
    from runs import RUN
    out = tmp_path_factory.mktemp("run8") / "run"
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop JAX's compiled programs: one process runs the whole
    suite, and XLA:CPU maps memory for every executable it holds. Late in the py311
    suite a compile crashed the process (SIGSEGV/SIGABRT in LLVM compile or serialize,
    three runs in a row; the same tests alone pass); the kernel's default limit on a
    process's memory maps (vm.max_map_count = 65530) is the suspect."""
    yield
    jax.clear_caches()
    import gc
    gc.collect()


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
    """A random small Llama saved by transformers with a BPE tokenizer.json, and text."""
    transformers = pytest.importorskip("transformers")
    return save_small_hf(tmp_path_factory.mktemp("hf"), transformers.LlamaConfig,
                         transformers.LlamaForCausalLM)
