"""What `python -m train.serve` runs (train/serve.py parses the command line): the port
taken first, the HTTP server answering 503 while the engine loads and compiles, the
engine's loop on the main thread until SIGTERM or Ctrl-C, then the drain; on processes
other than 0, the same engine following process 0's steps.
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import socket
import threading
import time

from etils import epath

from train.data.chat import load_template
from train.errors import InputError
from train.inference.engine import Engine
from train.inference.load import find_tokenizer, load, quantize_weights
from train.inference.lockstep import Peers
from train.inference.server import Service, State, make_app

log = logging.getLogger("train")
END_MARK = "\u2063shardlm-end-of-turn\u2063"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads: a port in use is an error
    at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use; pass --port with a free one "
                             "(--port 0 picks one)") from None
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and "
                         "--port") from None
    sock.listen(2048)
    return sock


def serve(cfg, args) -> None:
    import jax
    if jax.process_index() != 0:
        return follow(cfg, args)
    import uvicorn
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    state = State(cfg.serve.model_name or args.checkpoint)
    # log_config=None: uvicorn leaves logging as start-up set it (its own config would
    # print the library's lines twice)
    server = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning",
                                           log_config=None, timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                            name="http")
    http.start()
    url = f"http://{host}:{port}"
    print(f"listening on {url} (503 until the model is ready)", flush=True)
    try:
        engine = start_engine(cfg, args, state)
        devices = engine.mesh.size
        print(f"serving {state.model_name!r} on {url}/v1 ({engine.B} slots of "
              f"{engine.max_len} tokens, {devices} device{'s' * (devices > 1)})", flush=True)
        run_until_signal(engine)
        drain(state, engine, cfg.serve.drain_s)
        engine.stop_followers()
    finally:
        server.should_exit = True
        http.join(timeout=10)


def build_engine(cfg, args):
    """(the engine on the config's mesh, the tokenizer, the model's loaded form); every
    process builds it (the load and the compiles are collective)."""
    import jax
    loaded = load(args.checkpoint, cfg, args.overrides)
    tok = find_tokenizer(loaded, args.tokenizer)
    note = quantize_weights(loaded, cfg.serve.quantize)
    if note and jax.process_index() == 0:
        print(note, flush=True)
    engine = Engine.of_config(loaded.model, loaded.mesh, loaded.rules, cfg.serve,
                              eos_id=tok.eos_id,
                              vocab_limit=min(tok.vocab_size, loaded.cfg.model.vocab_size),
                              peers=Peers.of_this_run())
    return engine, tok, loaded


def start_engine(cfg, args, state: State) -> Engine:
    engine, tok, loaded = build_engine(cfg, args)
    template = load_template(tok.path) if getattr(tok, "kind", None) == "hf" else None
    state.ready(Service(engine, tok, template, model_name=state.model_name,
                        chat_stop_ids=chat_stop_ids(tok, template, loaded.artifact_dir),
                        metrics=state.metrics))
    return engine


def follow(cfg, args) -> None:
    """A process other than 0: the same engine, stepping as process 0 plans, until
    process 0 stops (SIGTERM here is left to process 0, which drains first)."""
    import jax
    engine, _, _ = build_engine(cfg, args)
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: process 0 ends the server"))
    print(f"process {jax.process_index()}: following process 0's engine steps", flush=True)
    engine.follow()
    print(f"process {jax.process_index()}: process 0 stopped the server", flush=True)


def chat_stop_ids(tok, template, artifact_dir: str) -> frozenset[int]:
    """Token ids that end an assistant's turn besides EOS: the special token the chat
    template writes after a reply (Llama 3's <|eot_id|>, ChatML's <|im_end|>), and the
    eos_token_id(s) of a generation_config.json beside the model."""
    ids = set()
    if template is not None:
        text = template.render([{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": END_MARK}])
        tail = text[text.rindex(END_MARK) + len(END_MARK):] if END_MARK in text else ""
        special = {i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special}
        ids |= {next((i for i in tok.encode_batch([tail])[0] if i in special), tok.eos_id)}
    config = epath.Path(artifact_dir) / "generation_config.json"
    if config.exists():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return frozenset(ids)


def run_until_signal(engine: Engine) -> None:
    """The engine's loop on this (the main) thread until SIGTERM or Ctrl-C."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():  # a second one: stop at once
            raise KeyboardInterrupt
        log.info("%s: draining", signal.Signals(signum).name)
        stop.set()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    engine.run(stop)


def drain(state: State, engine: Engine, drain_s: float) -> None:
    """New requests get 503; those in flight run until done or drain_s has passed, the
    rest are cancelled."""
    state.status = "draining"
    inflight = engine.busy
    deadline = time.monotonic() + drain_s
    while engine.busy and time.monotonic() < deadline:
        if not engine.step():
            time.sleep(0.01)
    left = engine.busy
    if left:
        engine.cancel_all()
        engine.step()
    time.sleep(0.2)  # the event loop sends the last chunks
    print(f"drained: {inflight - left} of {inflight} requests in flight finished, {left} "
          "cancelled", flush=True)

