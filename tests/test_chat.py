"""Chat data for fine-tuning: templates rendered and tokenized as `transformers` does,
only the assistant's tokens trained on, examples packed whole, and a completion-only
run that learns the replies and not the noise around them."""

import json

import jax
import numpy as np
import pytest

from train.data.chat import ChatEncoder, load_template
from train.data.packing import PackedExamples, pack_whole
from train.data.prepared import prepare
from train.data.tokenizer import load_tokenizer
from train.errors import DataError

from chat_templates import TEMPLATES, write_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Thanks! And Spain?"},
    {"role": "assistant", "content": "<think>\nThe user asks for a sum.\n</think>\n\nMadrid."}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{template name: tokenizer.json path}, each directory with its template."""
    root = tmp_path_factory.mktemp("tok")
    return {name: write_tokenizer(root / name, t) for name, t in TEMPLATES.items()}


def encoder(path) -> ChatEncoder:
    return ChatEncoder(load_tokenizer(str(path)), load_template(str(path)))


def trained_text(hf, ex) -> str:
    return hf.decode([int(i) for i, w in zip(ex.ids, ex.weights) if w])


@pytest.mark.parametrize("name", ["llama3", "qwen2.5", "chatml-marked", "llama3-marked"])
def test_templates_render_tokenize_and_mask_as_transformers(tokenizers, name):
    """The same token ids as apply_chat_template; the trained tokens are each assistant
    turn's content and end-of-turn tokens, and where the template marks them
    ({% generation %}) exactly transformers' assistant mask."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizers[name].parent)
    (ex,) = encoder(tokenizers[name]).encode({"messages": CONVERSATION}, "row")
    want = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask="marked" in name)
    assert ex.ids.tolist() == list(want["input_ids"])
    if "marked" in name:
        assert ex.weights.tolist() == list(want["assistant_masks"])
    end = "<|eot_id|>" if "llama3" in name else "<|im_end|>\n"
    assert trained_text(hf, ex) == (f"The capital of France is Paris.{end}<think>\nThe user "
                                    f"asks for a sum.\n</think>\n\nMadrid.{end}")


def test_a_template_that_rewrites_earlier_turns_gives_one_example_per_turn(tokenizers):
    """Qwen3 drops the reasoning of turns before the last user query: each assistant turn
    becomes its own example, rendered as transformers renders the conversation up to it
    (the context the model writes that turn in), its turn alone trained on."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizers["qwen3"].parent)
    enc = encoder(tokenizers["qwen3"])
    examples = enc.encode({"messages": CONVERSATION}, "row")
    assert len(examples) == 2 and enc.per_turn == 1
    for ex, end in zip(examples, (3, 5)):
        want = hf.apply_chat_template(CONVERSATION[:end], tokenize=True, return_dict=True)
        assert ex.ids.tolist() == list(want["input_ids"])
    assert trained_text(hf, examples[0]) == ("<think>\n\n</think>\n\nThe capital of France is "
                                             "Paris.<|im_end|>\n")
    assert trained_text(hf, examples[1]) == ("<think>\nThe user asks for a sum.\n</think>\n\n"
                                             "Madrid.<|im_end|>\n")


def test_prompt_completion_rows_follow_trl(tokenizers):
    """Strings: concatenated as they are, the completion and an EOS after it trained on;
    message lists: rendered with the template, the completion's turn trained on."""
    enc = encoder(tokenizers["qwen2.5"])
    tok = enc.tok
    (ex,) = enc.encode({"prompt": "What is 2+2? ", "completion": "It is 4."}, "row")
    assert ex.ids.tolist() == tok.encode_batch(["What is 2+2? It is 4."])[0] + [tok.eos_id]
    assert ex.ids[-1] == tok.eos_id and ex.weights[-1] == 1  # the model learns to stop
    assert tok.decode(ex.ids[ex.weights == 1][:-1].tolist()) == "It is 4."
    (ex,) = enc.encode({"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}, "row")
    (whole,) = enc.encode({"messages": CONVERSATION[:3]}, "row")
    assert ex.ids.tolist() == whole.ids.tolist() and ex.weights.tolist() == whole.weights.tolist()


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
     "data.jsonl line 1: messages[1] has role 'bot'; allowed: system, user, assistant, tool, "
     "developer"),
    ({"messages": [{"role": "user", "content": "hi"}]},
     "data.jsonl line 1: the conversation has no assistant message (nothing to train on)"),
    ({"messages": [{"role": "user"}]}, "data.jsonl line 1: messages[0] must have 'role' and "
     "'content'"),
    ({"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]},
     "data.jsonl line 1: 'prompt' and 'completion' must both be strings or both message lists"
     " (got str and list)"),
])
def test_bad_rows_are_one_line_naming_file_and_line(tokenizers, tmp_path, row, message):
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        prepare(str(tmp_path / "data.jsonl"), tmp_path / "out", str(tokenizers["qwen2.5"]),
                progress=False, log=lambda line: None)
    assert str(err.value) == str(tmp_path / message)


def test_conversations_need_the_tokenizers_template(tmp_path):
    path = write_tokenizer(tmp_path / "tok", None)
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    with pytest.raises(DataError, match="data.jsonl line 1: conversations need the model's chat "
                                        "template, and .*tokenizer.json has none beside it"):
        prepare(str(tmp_path / "data.jsonl"), tmp_path / "out", str(path), progress=False,
                log=lambda line: None)


def test_examples_are_packed_whole_and_masked_from_each_other(tmp_path):
    """Hand-computed packing of lengths 3, 5, 2, 9, 4 into sequences of 8: [3, 5], [2],
    [9 cut to 8] (or left out), [4]; each example's targets stay inside it."""
    kept, starts = pack_whole(np.array([3, 5, 2, 9, 4]), 8, "truncate")
    assert kept.tolist() == [0, 1, 2, 3, 4] and starts.tolist() == [0, 2, 3, 4, 5]
    kept, starts = pack_whole(np.array([3, 5, 2, 9, 4]), 8, "drop")
    assert kept.tolist() == [0, 1, 2, 4] and starts.tolist() == [0, 2, 4]
    tokens = np.arange(10, 33, dtype=np.uint16)  # 23 tokens: examples of 3, 5, 2, 9, 4
    weights = (tokens % 2).astype(np.uint8)
    tokens.tofile(tmp_path / "train.tokens")
    weights.tofile(tmp_path / "train.weights")
    np.save(tmp_path / "train.offsets.npy", np.array([0, 3, 8, 10, 19, 23]))
    (tmp_path / "meta.json").write_text(json.dumps({
        "format": "shardlm-tokens/1", "dtype": "uint16", "splits": {"train": {"tokens": 23}}}))
    seqs = PackedExamples(str(tmp_path), "train", 8, "truncate")
    assert len(seqs) == 4 and seqs.overlong == 1
    first = seqs[0]
    assert first["inputs"].tolist() == list(range(10, 18))
    assert first["targets"].tolist() == [11, 12, 0, 14, 15, 16, 17, 0]
    assert first["weights"].tolist() == [1, 0, 0, 0, 1, 0, 1, 0]  # the target's weight
    assert first["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    assert first["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    padded = seqs[1]
    assert padded["inputs"].tolist() == [18, 19] + [0] * 6
    assert padded["weights"].tolist() == [1] + [0] * 7
    assert padded["segment_ids"].tolist() == [1, 1] + [0] * 6
    cut = seqs[2]
    assert cut["inputs"].tolist() == list(range(20, 28)) and cut["weights"][-1] == 0


def test_completion_only_loss_equals_a_hand_computation(tokenizers, tmp_path, devices):
    """The train step's loss on a packed chat batch is the mean, over the assistant's
    target tokens of the whole batch, of -log p(target) from the model's logits."""
    from train.plan import plan
    from train.state import init_state
    from train.step import compute_grads

    from helpers import small_config
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": "Answer " * (i % 3 + 1)}]}
            for i in range(24)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = small_config(f"data.path={tmp_path / 'chat.jsonl'}", f"data.cache_dir={tmp_path}/c",
                       f"data.tokenizer={tokenizers['qwen2.5']}", "model.vocab_size=512",
                       "train.seq_len=128", "model.max_seq_len=128", "train.batch_size=4",
                       "mesh.fsdp=2", "train.microbatches=2")
    from train.data.batches import make_batches
    from train.data.resolve import resolve_data
    cfg, path = resolve_data(cfg)
    p = plan(cfg, devices=devices[:2])
    batches = make_batches(cfg, p.batch_sharding, path)
    batch = batches.batch(0)
    state = init_state(p.init, p.shardings, 0)
    terms, _ = jax.jit(compute_grads)(state, batch)
    host = {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in batch.items()}
    logits = np.asarray(state.model()(host["inputs"], positions_BT=host["positions"],
                                      segment_ids_BT=host["segment_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, host["targets"][..., None], -1)[..., 0]
    w = host["weights"]
    assert 0 < w.sum() < (host["segment_ids"] > 0).sum()  # the prompts are not trained on
    np.testing.assert_allclose(float(terms["loss"]), (nll * w).sum() / w.sum(), rtol=1e-5)
    batches.close()


@pytest.mark.once
def test_a_chat_run_learns_the_replies_and_not_the_noise_around_them(chat_run):
    """User turns of random noise, assistant replies that follow from nothing but the
    template: with only the assistant's tokens trained on, `python -m train` on the
    JSONL (conftest.chat_run) drives the training loss near zero (the noise would keep
    it far above)."""
    out, log = chat_run
    assert "chat examples packed whole" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.05, [r["loss"] for r in rows]
    assert (out / "chat_template.jinja").exists()  # beside the run, for generation
