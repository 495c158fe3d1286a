"""DPO: the loss and its gradient against TRL's formula computed on each answer alone,
its beta -> 0 limit, preference rows packed as pairs with only the answers weighed, and
a LoRA DPO run from a Hugging Face model that learns the preference and, killed with
SIGKILL, resumes bit for bit."""

import json
import math
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import dpo
from train.data.packing import PackedExamples
from train.data.prepared import prepare
from train.errors import DataError
from train.plan import plan
from train.state import init_state
from train.step import compute_grads, eval_step

from chat_templates import TEMPLATES, write_tokenizer
from helpers import REPO, cli_env, run_cli, small_config

DPO = ("train.objective=dpo", "data.path=unused", "model.vocab_size=256")


def trl_loss(pc, pr, rc, rr, beta, eps):
    """TRL's sigmoid DPO loss, written out: -(1-eps) log s(h) - eps log s(-h)."""
    h = beta * ((pc - rc) - (pr - rr))
    return -(1 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)


def answer_logp(model, ids, weights):
    """Sum of log p(token) over an answer's tokens (weight 1), the sequence alone."""
    logp = jax.nn.log_softmax(model(jnp.asarray(ids)[None])[0].astype(jnp.float32))
    return jnp.sum(logp[jnp.arange(len(ids) - 1), ids[1:]] * weights[1:])


def example(rng, vocab, prompt, answer):
    ids = rng.integers(0, vocab, prompt + answer)
    return ids, np.r_[np.zeros(prompt), np.ones(answer)].astype(np.float32)


def pack(rows, T):
    """Rows of pairs packed as PackedExamples packs them: segments 2j+1, 2j+2."""
    out = {k: np.zeros((len(rows), T), np.int32) for k in ("inputs", "targets",
                                                          "segment_ids", "positions")}
    out["weights"] = np.zeros((len(rows), T), np.float32)
    for r, pairs in enumerate(rows):
        p = 0
        for s, (ids, w) in enumerate([e for pair in pairs for e in pair], 1):
            n = len(ids)
            out["inputs"][r, p:p + n], out["targets"][r, p:p + n - 1] = ids, ids[1:]
            out["weights"][r, p:p + n - 1] = w[1:]
            out["segment_ids"][r, p:p + n], out["positions"][r, p:p + n] = s, np.arange(n)
            p += n
    return out


def test_the_loss_and_its_gradient_equal_trls_formula_on_each_answer_alone(devices, eps=0.2):
    """Three pairs packed in two rows (two microbatches): the loss, the metrics
    and every gradient equal TRL's formula on log-probs summed over each answer's tokens,
    each sequence run alone, the reference being the starting parameters."""
    cfg = small_config(*DPO, "dpo.beta=0.5", f"dpo.label_smoothing={eps}")
    p = plan(cfg, devices[:1], batches=False)  # one device: sequences run alone too
    state = init_state(p.init, p.shardings, 0)
    V = cfg.model.vocab_size
    noise = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                         state.params)
    state = state.replace(params=jax.tree.map(jnp.add, state.params, noise))
    rng = np.random.default_rng(0)
    rows = [[(example(rng, V, 3, 2), example(rng, V, 3, 3)),
             (example(rng, V, 1, 1), example(rng, V, 1, 2))],
            [(example(rng, V, 4, 3), example(rng, V, 4, 4))]]
    T = cfg.train.seq_len
    batch = pack(rows, T)

    def hand(params):
        policy = nnx.merge(state.graphdef, params)
        reference = nnx.merge(state.graphdef, state.reference)
        losses, margins = [], []
        for (c, r) in [pair for row in rows for pair in row]:
            pc, pr = answer_logp(policy, *c), answer_logp(policy, *r)
            rc, rr = answer_logp(reference, *c), answer_logp(reference, *r)
            losses.append(trl_loss(pc, pr, rc, rr, 0.5, eps))
            margins.append(0.5 * ((pc - rc) - (pr - rr)))
        return jnp.mean(jnp.stack(losses)), jnp.stack(margins)

    (want, margins), want_grads = jax.jit(jax.value_and_grad(hand, has_aux=True))(
        state.params)
    assert float(jnp.min(jnp.abs(margins))) > 1e-4  # the policy is not the reference
    micro = {k: v.reshape(2, 1, T) for k, v in batch.items()}  # two microbatches
    terms, grads = jax.jit(compute_grads)(state, micro)
    np.testing.assert_allclose(terms["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(terms["reward_margin"], jnp.mean(margins), rtol=1e-4,
                               atol=1e-7)
    assert float(terms["reward_accuracy"]) == float(jnp.mean(margins > 0))
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-7)
    sums = jax.jit(eval_step)(state, micro)  # evaluation: the same pairs' sums
    assert float(sums["weight"]) == 3
    np.testing.assert_allclose(sums["loss_sum"] / 3, want, rtol=1e-5)
    np.testing.assert_allclose(sums["reward_accuracy_sum"] / 3, jnp.mean(margins > 0))


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_beta_to_zero_gives_log_2_and_a_gradient_of_minus_beta_half(eps):
    """As beta -> 0: loss -> log 2 and d loss / d log pi(chosen) -> -beta (1 - 2 eps) / 2
    (the sigmoid's value and slope at 0), whatever the log-probs."""
    x = jnp.array([-3.0, -7.0, -2.5, -4.0])
    for beta in (1e-3, 1e-5):
        def f(x, beta=beta):
            return dpo.loss(*x, beta, eps)[0]
        np.testing.assert_allclose(f(x), math.log(2), rtol=1e-2 * beta / 1e-3)
        g = jax.grad(f)(x) / beta
        np.testing.assert_allclose(g, [-(1 - 2 * eps) / 2, (1 - 2 * eps) / 2,
                                       (1 - 2 * eps) / 2, -(1 - 2 * eps) / 2], rtol=1e-2)
    np.testing.assert_allclose(dpo.loss(*x, 0.7, eps)[0], trl_loss(*x, 0.7, eps), rtol=1e-6)


def test_preference_rows_pack_as_pairs_and_weigh_only_the_answers(tmp_path):
    """Rows as strings and as messages: each pair packed whole as segments 2j+1 (chosen)
    and 2j+2 (rejected), the weighted tokens exactly the answer (and its end of turn);
    an over-long pair has each answer cut to half a sequence."""
    transformers = pytest.importorskip("transformers")
    tok = write_tokenizer(tmp_path / "tok", TEMPLATES["llama3"])
    hf = transformers.AutoTokenizer.from_pretrained(tok.parent)
    rows = [{"prompt": "Capital of France?\n", "chosen": "Paris.", "rejected": "Rome."},
            {"prompt": [{"role": "user", "content": "2+2?"}],
             "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "five"}]},
            {"prompt": "x " * 10, "chosen": "long " * 40, "rejected": "no"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = prepare(str(path), tmp_path / "prep", str(tok), val_fraction=0.0, progress=False,
                   log=lambda s: None)
    assert meta["kind"] == "preference" and meta["splits"]["train"]["documents"] == 6
    packed = PackedExamples(str(tmp_path / "prep"), "train", 48, "truncate", pairs=True)
    assert packed.overlong == 1
    seqs = [packed[k] for k in range(len(packed))]
    answers = []
    for s in seqs:
        for seg in range(1, s["segment_ids"].max() + 1):
            on = (s["segment_ids"] == seg) & (s["weights"] > 0)
            answers.append(hf.decode(s["targets"][on]))
        assert s["segment_ids"].max() % 2 == 0  # pairs whole
    assert answers[:4] == ["Paris.<|endoftext|>", "Rome.<|endoftext|>", "4<|eot_id|>",
                           "five<|eot_id|>"]
    last = seqs[-1]
    assert np.sum(last["segment_ids"] == 1) == 24  # the chosen answer cut to T / 2
    assert answers[5] == "no<|endoftext|>"


def test_a_preference_row_without_an_answer_is_named(tmp_path):
    tok = write_tokenizer(tmp_path / "tok", TEMPLATES["llama3"])
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(DataError) as err:
        prepare(str(path), tmp_path / "prep", str(tok), progress=False, log=lambda s: None)
    assert str(err.value) == (f"{path} line 2: a preference row needs 'prompt', 'chosen' and "
                              "'rejected'; it has no 'rejected' (has: prompt, chosen)")


def test_bad_preference_input_is_one_line(tmp_path, hf_llama_dir):
    root, _ = hf_llama_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                   + json.dumps({"prompt": "a", "chosen": "b", "rejected": 3}) + "\n")
    base = ["--config", str(REPO / "configs" / "finetune.yaml"), f"model.init_from=hf:{root}",
            f"data.cache_dir={tmp_path}/cache", f"output_dir={tmp_path}/out",
            "compile_cache_dir=null", "train.seq_len=64"]
    proc = run_cli(*base, f"data.path={bad}", "train.objective=dpo", devices=1)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad} line 2: 'prompt' and 'rejected' must both be strings or both message lists "
        "(got str and int)")
    proc = run_cli(*base, f"data.path={root}/corpus.txt", "train.objective=dpo", devices=1)
    assert proc.returncode == 2
    assert "train.objective=dpo trains on preference pairs" in proc.stderr.splitlines()[-1]
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    proc = run_cli(*base, f"data.path={good}", devices=1)
    assert proc.returncode == 2
    assert "holds preference pairs" in proc.stderr.splitlines()[-1]
    assert "set train.objective=dpo" in proc.stderr.splitlines()[-1]


def preference_rows(n: int) -> str:
    """A prompt, the continuation the base model's corpus has (chosen) and a garbled one."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 200))
        garbled = "".join(rng.choice(list("xyz(:+ "), 12))
        out.append({"prompt": f"def f{k}(x):\n", "chosen": f"    return x * {k} + {k % 7}\n",
                    "rejected": f"    {garbled}\n"})
    return "".join(json.dumps(r) + "\n" for r in out)


def metrics(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                      .splitlines())}


@pytest.mark.once
def test_a_lora_dpo_run_learns_the_preference_and_resumes_bit_for_bit(hf_llama_dir,
                                                                       tmp_path):
    """LoRA DPO from an HF Llama on an fsdp x model mesh: step 1's loss is log 2 (the
    policy starts as its reference), the reward accuracy and margin rise; killed with
    SIGKILL after a checkpoint and rerun, every logged metric equals an uninterrupted
    run's bit for bit."""
    root, _ = hf_llama_dir
    data = tmp_path / "prefs.jsonl"
    data.write_text(preference_rows(64))
    args = ["--config", str(REPO / "configs" / "finetune.yaml"), f"model.init_from=hf:{root}",
            f"data.path={data}", f"data.cache_dir={tmp_path}/cache", "train.objective=dpo",
            "dpo.beta=0.5", "model.dtype=float32", "train.seq_len=64", "train.batch_size=8",
            "train.steps=8", "train.log_every=1", "train.microbatches=2", "mesh.data=2",
            "mesh.fsdp=2", "mesh.model=2", "sharding.rules=fsdp_tp", "compile_cache_dir=null",
            "optimizer.lr=5e-3", "optimizer.warmup_steps=1", "checkpoint.every_steps=4",
            "eval.every_steps=4", "eval.batches=1", "data.val_fraction=0.1",
            "model.lora.rank=8", "model.lora.alpha=16", "model.lora.dropout=0.1"]
    ref_out = tmp_path / "reference"
    proc = run_cli(*args, f"output_dir={ref_out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preference pairs packed whole" in proc.stdout
    ref = metrics(ref_out)
    assert abs(ref[1]["loss"] - math.log(2)) < 1e-6 and ref[1]["reward_margin"] == 0.0
    assert ref[8]["reward_accuracy"] == 1.0 and ref[8]["reward_margin"] > 0.5
    assert ref[8]["loss"] < 0.5
    assert ref[4]["eval_loss"] > ref[8]["eval_loss"] and "eval_ppl" not in ref[8]
    assert ref[8]["eval_reward_accuracy"] > 0.5

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", *args, f"output_dir={out}"],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    from runs import wait_for
    wait_for(lambda: (out / "checkpoints" / "4").is_dir(), proc)  # saved in full
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc = run_cli(*args, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 4" in proc.stdout, proc.stdout[-3000:]
    resumed = metrics(out)
    keys = ("loss", "grad_norm", "reward_chosen", "reward_rejected", "reward_accuracy",
            "eval_loss", "eval_reward_margin")
    for step, row in ref.items():
        assert {k: resumed[step].get(k) for k in keys} == {k: row.get(k) for k in keys}, step


def test_full_fine_tuning_dpo_keeps_a_frozen_reference_copy(hf_llama_dir, tmp_path):
    """Without LoRA the reference is a copy of the starting weights in the state: the
    first step's loss is log 2, the layout tool counts the copy."""
    root, _ = hf_llama_dir
    data = tmp_path / "prefs.jsonl"
    data.write_text(preference_rows(16))
    args = ["--config", str(REPO / "configs" / "finetune.yaml"), f"model.init_from=hf:{root}",
            f"data.path={data}", f"data.cache_dir={tmp_path}/cache", "train.objective=dpo",
            "model.dtype=float32", "train.seq_len=64", "train.batch_size=4",
            "compile_cache_dir=null", "eval.every_steps=0", "checkpoint.every_steps=0",
            "optimizer.warmup_steps=1", "optimizer.lr=1e-3"]
    proc = run_cli(*args, "train.steps=3", "train.log_every=1", f"output_dir={tmp_path}/o",
                   devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(tmp_path / "o")
    assert abs(rows[1]["loss"] - math.log(2)) < 1e-6 and rows[3]["reward_margin"] != 0.0
    lines = {}
    for extra in ((), ("model.lora.rank=8",)):
        proc = run_cli(*args, *extra, module="train.layout", devices=4)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines[extra] = proc.stdout
    assert "DPO reference copy" in lines[()]
    assert "DPO reference copy" not in lines[("model.lora.rank=8",)]
