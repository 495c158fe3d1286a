"""`python -m train.serve` on a 2x2x2 mesh, called with the real `openai` client: greedy
results equal `train.generate`'s, chat rendered as `transformers` renders it, 32
concurrent requests each as it runs alone, seeds that reproduce samples whatever else
runs, cancellation, the queue limit, OpenAI error JSON, and SIGTERM's drain.

The model is conftest's chat_run: a tiny Llama fine-tuned until it answers every user
turn with "Thanks, noted." (briefly trained, so greedy choices have no near-ties).
"""

import concurrent.futures
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from test_inference_cli import continuations

from train.errors import CheckpointError

from helpers import REPO, cli_env, run_cli

openai = pytest.importorskip("openai")

NAME = "tiny-chat"
MESH8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.model=2", "sharding.rules=fsdp_tp"]
# 4 slots (the mesh's 4 batch ways), 4 prefill rows, 32 waiting: at most 40 at once
SERVE = [*MESH8, "serve.max_batch=4", "serve.max_len=128", "serve.max_queue=32",
         "serve.drain_s=60", f"serve.model_name={NAME}"]
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "zeta", "kappa", "sigma"]


def chat_text(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class Server:
    """`python -m train.serve` in a subprocess, its output collected by a thread."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--port", "0",
                                      *args], cwd=REPO, env=env or cli_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.wait_for(r"listening on (http://\S+)").group(1)
        self.starting = []  # /health's answers before the model was ready
        while not any("serving" in line for line in self.lines):
            self.starting.append(self.get("/health"))
            time.sleep(0.2)
            assert self.proc.poll() is None, self.output

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300):
        end = time.time() + timeout
        while time.time() < end:
            for line in self.lines:
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, f"server ended early: {self.output}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {self.output}")

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=120)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[1]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.fixture(scope="module")
def server(chat_run):
    s = Server("--checkpoint", str(chat_run[0]), *SERVE)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


def complete(client, prompt, **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return client.completions.create(model=NAME, prompt=prompt, **kw)


def streamed(client, prompt, **kw) -> tuple[str, str]:
    """(the text of a streamed completion, its finish reason)."""
    text, reason = "", None
    for chunk in complete(client, prompt, stream=True, **kw):
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    return text, reason


def test_503_while_starting_then_models_and_health(server):
    assert server.starting and all(status == 503 and "starting" in body
                                   for status, body in server.starting), server.starting
    assert server.get("/health") == (200, '{"status":"ok"}')
    (model,) = server.client().models.list().data
    assert model.id == NAME


def test_greedy_completions_equal_train_generate_streamed_and_not(server, chat_run, tmp_path):
    prompts = [chat_text("alpha beta gamma"), "kappa sigma zeta", "Thanks, noted.",
               chat_text("omega")]
    (tmp_path / "p.txt").write_text("".join(p.replace("\n", "\\n") + "\n" for p in prompts))
    gen = run_cli("--checkpoint", str(chat_run[0]), "--prompts-file", str(tmp_path / "p.txt"),
                  "--max-new-tokens", "12", *MESH8, module="train.generate")
    assert gen.returncode == 0, gen.stderr[-2000:]
    expected = continuations(gen.stdout)
    client = server.client()
    got = [p + complete(client, p).choices[0].text for p in prompts]
    assert got == expected
    assert [p + streamed(client, p)[0] for p in prompts] == expected
    # an engine call's 4 tokens (serve.decode_steps) go out in one chunk: 12 tokens are
    # the prefill's first, then calls of 4, 4 and 3, at most 4 chunks
    texts = [c.choices[0].text for c in complete(client, prompts[1], stream=True)]
    assert "".join(texts) == expected[1][len(prompts[1]):]
    assert 1 <= sum(bool(t) for t in texts) <= 4, texts
    assert expected[0][len(prompts[0]):].startswith("Thanks, noted.")  # the trained reply


def test_chat_renders_the_template_as_transformers_does(server, chat_run):
    """The reply to a conversation is the trained one, ended by the template's end of
    turn; its prompt is transformers' rendering, token for token (the completion of
    apply_chat_template's ids begins with the same reply)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chat_run[0])
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "zeta omega alpha"}]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                 return_dict=True)["input_ids"]
    client = server.client()
    reply = client.chat.completions.create(model=NAME, messages=messages, temperature=0)
    assert reply.choices[0].message.content == "Thanks, noted."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(ids)
    # the end of turn (<|im_end|>) ends it, and, like EOS, is not one of its tokens
    assert reply.usage.completion_tokens == len(hf.encode("Thanks, noted."))
    assert complete(client, list(ids), max_tokens=10).choices[0].text.startswith("Thanks, noted.")
    chunks = list(client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Thanks, noted."
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_32_concurrent_requests_each_get_what_they_get_alone(server):
    """Prompts of 1 to 18 words (2 to 90 tokens) and 2 to 24 new tokens (12x), all at
    once through 4 slots: each result equals the same request served alone."""
    client = server.client()
    rng = __import__("numpy").random.default_rng(5)
    prompts = [" ".join(rng.choice(WORDS, n)) for n in rng.integers(1, 19, 32)]
    prompts[:2] = ["alpha", " ".join(["kappa"] * 18)]
    limits = [int(n) for n in rng.integers(2, 25, 32)]
    limits[:2] = [24, 2]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda pl: complete(client, pl[0], max_tokens=pl[1]),
                                 zip(prompts, limits)))
    alone = [complete(client, p, max_tokens=n) for p, n in zip(prompts, limits)]
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]
    assert [r.usage.completion_tokens for r in together] == limits  # no EOS in 24 tokens


def test_seeds_reproduce_samples_whatever_else_runs(server):
    client = server.client()
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9)
    alone = complete(client, "alpha", seed=123, **kw).choices[0].text
    others = [("beta gamma", 7), ("omega " * 9, 8), (chat_text("zeta"), 9), ("kappa", 10)]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        crowd = [pool.submit(complete, client, p, seed=s, **kw) for p, s in others]
        again = pool.submit(complete, client, "alpha", seed=123, **kw)
        [f.result() for f in crowd]
    assert again.result().choices[0].text == alone
    assert complete(client, "alpha", seed=124, **kw).choices[0].text != alone


def test_a_client_that_goes_away_frees_its_slot(server):
    client = server.client()
    before = server.metric('shardlm_generations_total{reason="cancelled"}')
    streams = [complete(client, w, max_tokens=110, stream=True) for w in WORDS[:4]]
    for s in streams:  # every slot taken, a token read, then the client leaves
        next(iter(s))
        s.close()
    end = time.time() + 30
    while server.metric('shardlm_generations_total{reason="cancelled"}') < before + 4:
        assert time.time() < end, server.get("/metrics")[1]
        time.sleep(0.1)
    assert server.metric("shardlm_slots_busy") == 0
    assert complete(client, "beta", max_tokens=3).usage.completion_tokens == 3


def test_a_full_queue_answers_429_and_the_rest_are_served(server):
    """48 requests at once where at most 40 fit (4 slots, 4 prefill rows,
    serve.max_queue=32)."""
    client = server.client()

    def call(i):
        try:
            return complete(client, WORDS[i % 8], max_tokens=60).usage.completion_tokens
        except openai.RateLimitError as e:
            return e.body["message"]
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(call, range(48)))
    refused = [a for a in answers if isinstance(a, str)]
    assert len(refused) >= 8 and all("serve.max_queue=32" in a for a in refused)
    assert all(a == 60 for a in answers if not isinstance(a, str))
    assert complete(client, "beta", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", b"{bad", 400, "not valid JSON"),
    ("/v1/completions", {"model": NAME}, 400, "prompt: Field required"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": 3}, 400,
     "temperature: Input should be less than or equal to 2"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 127}, 400,
     "plus max_tokens=127 is 129, above serve.max_len=128"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": 2}, 400, "n=2 is not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 1}, 400,
     "logprobs=1 is not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "echo": True}, 400,
     "echo=True is not supported"),
    ("/v1/completions", {"model": NAME, "prompt": [9999]}, 400, "outside the vocabulary"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages: List should"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "reads text parts only"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user",
                                                               "content": "hi"}]},
     404, "the model 'gpt-4o' does not exist"),
    ("/v1/embeddings", {"model": NAME}, 404, "no route /v1/embeddings"),
])
def test_bad_requests_get_their_status_and_openais_error_json(server, path, body, status,
                                                               message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = server.post(path, raw)
    assert got == status and message in answer["error"]["message"], answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_the_openai_client_raises_its_own_errors_and_the_server_serves_on(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="n=3 is not supported"):
        client.completions.create(model=NAME, prompt="hi", n=3)
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist") as e:
        client.completions.create(model="nope", prompt="hi")
    assert e.value.code == "model_not_found"
    assert complete(client, "beta", max_tokens=2).usage.completion_tokens == 2


def test_chat_without_a_template_and_routes_while_starting():
    """The HTTP layer in this process over a stand-in engine: chat on a model without a
    chat template is a 400 naming it; every route is 503 until the model is ready."""
    import uvicorn

    from train.data.tokenizer import ByteTokenizer
    from train.inference.server import Service, State, make_app
    from train.inference.serving import bind
    state = State("bytes")
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                               api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="starting"):
            client.completions.create(model="bytes", prompt="hi")
        engine = SimpleNamespace(queued=0, slots_busy=0, B=1, vocab_limit=256, max_len=64,
                                 kv_pages=0, free_pages=[])
        state.ready(Service(engine, ByteTokenizer(), None, model_name="bytes"))
        with pytest.raises(openai.BadRequestError, match="has no chat template"):
            client.chat.completions.create(model="bytes",
                                           messages=[{"role": "user", "content": "hi"}])
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_hugging_face_directory_is_read_as_model_init_from_reads_it(hf_llama_dir, devices):
    """`--checkpoint hf:DIR` (inference.load): the directory's shapes and tokenizer, the
    user's mesh and compute dtype, transformers' logits within 1e-4."""
    import numpy as np

    from train.config import load_config
    from train.inference.load import find_tokenizer, load

    from helpers import torch_logits
    root, ref = hf_llama_dir
    overrides = [*MESH8, "model.dtype=float32"]
    loaded = load(f"hf:{root}", load_config("configs/tiny.yaml", overrides), overrides)
    assert (loaded.cfg.model.num_layers, loaded.cfg.model.d_model) == (2, 64)  # not tiny's
    assert loaded.mesh.shape == {"data": 2, "fsdp": 2, "context": 1, "expert": 1, "model": 2}
    assert find_tokenizer(loaded).path == f"{root}/tokenizer.json"
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, (4, 24))
    ours = np.asarray(loaded.model(ids))[..., :ref.config.vocab_size]
    np.testing.assert_allclose(ours, torch_logits(ref, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        load(f"hf:{root}/nothing", load_config("configs/tiny.yaml"))


@pytest.mark.parametrize("case", ["missing", "max_len", "port"])
def test_start_up_errors_are_one_line(chat_run, case):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    args, code, message = {
        "missing": (["--checkpoint", "/no/such/run"], 1, "does not exist"),
        "max_len": (["--checkpoint", str(chat_run[0]), "serve.max_len=1000"], 2,
                    "serve.max_len=1000 is above the model's max_seq_len=256"),
        "port": (["--checkpoint", str(chat_run[0]), "--port", str(port)], 2,
                 f"port {port} on 127.0.0.1 is in use"),
    }[case]
    proc = run_cli(*args, module="train.serve", timeout=120)
    taken.close()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code and len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.once
def test_an_int8_server_answers_as_static_batching_on_the_same_weights(chat_run):
    """serve.quantize=int8: the server says what its weights now take, and its greedy
    completions are those of train.generate's Generator on the loaded model quantized
    in this process (models/quantize.py's own tests check the quantized model)."""
    from models.quantize import quantize
    from train.config import load_config
    from train.inference import Generator, find_tokenizer, load
    prompts = ["kappa sigma zeta", "Thanks, noted.", "omega"]
    s = Server("--checkpoint", str(chat_run[0]), *SERVE, "serve.quantize=int8")
    try:
        sizes = s.wait_for(r"serve.quantize=int8: layer weights in int8, parameters "
                           r"([\d.]+) MiB -> ([\d.]+) MiB")
        client = s.client()
        served = [complete(client, p).choices[0].text for p in prompts]
    finally:
        s.proc.kill()
    assert float(sizes.group(2)) < float(sizes.group(1))
    loaded = load(str(chat_run[0]), load_config(None, MESH8), MESH8)
    quantize(loaded.model, "int8")
    tok = find_tokenizer(loaded)
    gen = Generator(loaded.model, loaded.mesh, loaded.rules, eos_id=tok.eos_id,
                    vocab_limit=min(tok.vocab_size, loaded.cfg.model.vocab_size))
    out = gen.generate(getattr(tok, "encode_prompts", tok.encode_batch)(prompts), 12)
    assert served == [tok.decode(t) for t in out.tokens]


def test_two_processes_serve_as_one(server, chat_run):
    """2 processes x 4 devices on the same 2x2x2 mesh (jax.distributed on 127.0.0.1),
    with a paged KV cache (8 rows sharing 20 pages of 16 slots): process 0 serves HTTP
    and plans each step (admissions by slots and pages), process 1 follows; the answers
    are the one-process server's (4 rows of 128 slots each); SIGTERM to process 0 ends
    both with exit 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def env(i):
        return cli_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID=str(i))
    args = ["--checkpoint", str(chat_run[0]), *SERVE, "distributed.init_timeout_s=120",
            "serve.max_batch=8", "serve.kv_pages=20", "serve.page_size=16"]
    follower = subprocess.Popen([sys.executable, "-m", "train.serve", *args], cwd=REPO,
                                env=env(1), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    try:
        two = Server(*args, env=env(0))
        requests = [dict(prompt=chat_text("kappa zeta")), dict(prompt="omega beta"),
                    dict(prompt="alpha", temperature=1.0, seed=5, max_tokens=16)]

        def answers(s):
            client = s.client()
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                texts = list(pool.map(lambda kw: complete(client, **kw).choices[0].text,
                                      requests))
            chat = client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": "delta"}], temperature=0)
            return texts + [chat.choices[0].message.content]
        assert answers(two) == answers(server)
        assert (two.metric("shardlm_kv_pages"), two.metric("shardlm_kv_pages_used"),
                two.metric("shardlm_slots")) == (20, 0, 8)
        two.proc.send_signal(signal.SIGTERM)
        assert two.proc.wait(60) == 0, two.output
        assert follower.wait(60) == 0
        assert "process 0 stopped the server" in follower.stdout.read()
    finally:
        for p in (follower, getattr(locals().get("two"), "proc", None)):
            if p is not None and p.poll() is None:
                p.kill()


def test_sigterm_drains_the_requests_in_flight_and_exits_0(server):
    """Runs last: the server it stops is the module's."""
    client = server.client()
    stream = iter(complete(client, "gamma", max_tokens=100, stream=True,
                           stream_options={"include_usage": True}))
    first = next(stream)
    server.proc.send_signal(signal.SIGTERM)
    statuses = set()
    while server.proc.poll() is None and 503 not in statuses:
        try:
            statuses.add(server.get("/health")[0])
        except OSError:
            break
    rest = list(stream)
    assert first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    assert rest[-1].usage.completion_tokens == 100  # finished, not cut
    assert server.proc.wait(60) == 0, server.output
    assert 503 in statuses
    assert "drained: 1 of 1 requests in flight finished, 0 cancelled" in server.output
