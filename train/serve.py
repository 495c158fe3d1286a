"""`python -m train.serve --checkpoint PATH [--config X.yaml key=value ...] [--host H]
[--port N]`

An OpenAI-compatible HTTP server (train/inference/server.py) over the continuous-batching
engine (train/inference/engine.py), the model sharded on the config's mesh. PATH is what
`python -m train.generate` reads (a run, a checkpoints dir, a step's dir, an export) or
`hf:DIR`, a Hugging Face model directory. Settings: the config's `serve.*` keys.

The port is taken first (a port in use is an error before anything loads); until the
model is loaded and its programs compiled every route answers 503. SIGTERM or Ctrl-C:
new requests get 503, those in flight get serve.drain_s seconds to finish and are then
cancelled, and the process exits 0.

Several processes (one per host, joined by jax.distributed as for training): process
0 serves HTTP and plans each engine step, the others run the same steps
(train/inference/lockstep.py) and exit when process 0 does.
"""

from train import cli
from train.inference.serving import serve


def main(argv=None) -> None:
    p = cli.parser("Serve a trained (or Hugging Face) model over an OpenAI-compatible API.")
    p.add_argument("--checkpoint", required=True,
                   help="run output_dir, checkpoints dir, one step's dir, an export, or hf:DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the one the model came with)")
    cli.main(p, argv, serve, start={}, terminated="stopped by SIGTERM while starting")


if __name__ == "__main__":
    main()
