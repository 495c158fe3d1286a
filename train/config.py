"""The one typed config schema, and loading it from YAML files plus key=value overrides.

A YAML file may name `base: other.yaml` (or a list of them, applied in order); its own
values override the base's. Overrides use dotted keys: `mesh.data=2 model.num_layers=8`.
Every problem raises ConfigError with one line that names the key (and the file).
Each section checks its own values (`check()`); `validate` adds the checks that span
sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import yaml

from models.config import ModelConfig
from sharding.mesh import MESH_AXES
from train.errors import ConfigError
from train.optimizer_config import OptimizerConfig
from train.privacy_config import PrivacyConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _positive(section: str, obj, *keys: str, minimum: int = 1) -> None:
    for key in keys:
        if getattr(obj, key) < minimum:
            raise ConfigError(f"{section}.{key} must be at least {minimum}, got "
                              f"{getattr(obj, key)}")


def _not_s3(key: str, value: str | None) -> None:
    if value and value.startswith("s3://"):
        raise ConfigError(f"{key}={value!r}: s3:// is not supported (Orbax 0.12 cannot "
                          "write it; see README 'Checkpoints'); use gs://, a local path "
                          "or a mounted bucket")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # One size per parallelism, in mesh order (sharding.MESH_AXES); 1: unused, -1: the
    # devices left (one axis at most).
    data: int = 1
    fsdp: int = -1
    context: int = 1  # context parallelism: sequences split over it (fsdp_cp rules)
    expert: int = 1  # expert parallelism: MoE experts split over it (it also splits the batch)
    model: int = 1
    # Multi-slice (TPU) or multi-node (GPU): how many of an axis' ways go across slices
    # or processes over the data-center network (DCN); the rest stay on fast links (ICI).
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_context: int = 1
    dcn_expert: int = 1
    dcn_model: int = 1

    def axes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def dcn(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}") for a in MESH_AXES}

    def check(self) -> None:
        """Axis sizes are checked against the devices when the mesh is built."""
        _positive("mesh", self, *(f"dcn_{a}" for a in MESH_AXES))


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    # A preset name (dp, fsdp, tp, fsdp_tp, fsdp_ep, fsdp_tp_ep, fsdp_cp, fsdp_tp_cp) or
    # a mapping logical name -> mesh axes, optionally with `preset: NAME` to start from.
    rules: Union[str, dict] = "fsdp"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # global sequences per optimizer step
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many
    seq_len: int = 128
    seed: int = 0
    log_every: int = 10
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2)
    # A NaN/Inf loss or gradient norm: "stop" the run (the last good checkpoint stays) or
    # "skip" the update and go on (counted as skipped_steps in the metrics).
    nonfinite: Literal["stop", "skip"] = "stop"
    # what is minimised: "lm", next-token cross-entropy (pre-training, SFT), or "dpo",
    # Direct Preference Optimization on preference pairs (the `dpo` section)
    objective: Literal["lm", "dpo"] = "lm"

    def check(self) -> None:
        _positive("train", self, "steps", "batch_size", "microbatches", "seq_len", "log_every")
        if self.batch_size % self.microbatches:
            raise ConfigError(f"train.batch_size={self.batch_size} does not divide by "
                              f"train.microbatches={self.microbatches}")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Direct Preference Optimization (train.objective=dpo; train/dpo.py)."""

    beta: float = 0.1  # how far from the reference the policy may move (TRL's beta)
    label_smoothing: float = 0.0  # the chance a pair's preference is flipped (cDPO)

    def check(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in "
                              "[0, 0.5)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Your data: a directory made by `python -m train.prepare`, or raw inputs (a text
    # file, a directory, a glob; .jsonl, .parquet, a `datasets` save_to_disk directory),
    # prepared on the fly into cache_dir. When null, `source` picks the embedded data.
    path: Optional[str] = None
    source: Literal["stdlib", "synthetic"] = "stdlib"  # only when path is null
    tokenizer: str = "byte"  # byte | path/to/tokenizer.json | path/to/sentencepiece.model
    text_field: str = "text"  # JSONL field, Parquet or `datasets` column holding the text
    # text: documents; chat: conversations ({"messages": [...]}) or {"prompt", "completion"}
    # rows, rendered with the tokenizer's chat template, only the assistant's tokens
    # trained on (train/data/chat.py); auto: chat when the first row has those fields.
    format: Literal["auto", "text", "chat"] = "auto"
    # A chat example longer than train.seq_len: cut to its first seq_len tokens, or left out
    overlong: Literal["truncate", "drop"] = "truncate"
    eos_token: Optional[str] = None  # None: the tokenizer's own (</s>, <|endoftext|>, ...)
    vocab_multiple: int = 128  # model.vocab_size=null: tokenizer size rounded up to this
    val_fraction: float = 0.05  # documents (by a hash of their id) held out for eval
    mask_documents: bool = False  # packed documents do not attend to each other
    shuffle: bool = True  # shuffle sequences per epoch by train.seed
    num_workers: int = 0  # Grain worker processes (0: read in the training process)
    num_threads: int = 2  # Grain reader threads per process
    prefetch: int = 4  # batches read ahead
    cache_dir: str = "~/.cache/shardlm/prepared"  # where raw inputs are prepared
    max_bytes: int = 16_000_000  # cap on the stdlib corpus read

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        _positive("data", self, "vocab_multiple", "prefetch")
        _positive("data", self, "num_workers", "num_threads", minimum=0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0  # validation loss every this many steps and at the end; 0: off
    batches: int = 4  # global batches of the validation split per evaluation

    def check(self) -> None:
        _positive("eval", self, "every_steps", minimum=0)
        _positive("eval", self, "batches")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = None  # None: <output_dir>/checkpoints; gs://bucket/path works too
    every_steps: int = 100  # 0: only at the end and on preemption
    keep: int = 3  # the newest `keep` checkpoints are kept
    keep_every: Optional[int] = None  # also keep every step divisible by this, forever
    async_save: bool = True  # write in the background while training goes on
    save_timeout_s: float = 1800.0  # a save not committed by then stops the run
    # another run's checkpoint dir, or one step's dir: its parameters, optimizer state
    # and step (parameters only, for fine-tuning: model.init_from)
    resume_from: Optional[str] = None

    def check(self) -> None:
        _positive("checkpoint", self, "every_steps", minimum=0)
        _positive("checkpoint", self, "keep")
        if self.keep_every is not None:
            _positive("checkpoint", self, "keep_every")
        if self.save_timeout_s <= 0:
            raise ConfigError(f"checkpoint.save_timeout_s must be positive, got "
                              f"{self.save_timeout_s}")
        _not_s3("checkpoint.dir", self.dir)
        _not_s3("checkpoint.resume_from", self.resume_from)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    # null: on when a coordinator is given (here or JAX_COORDINATOR_ADDRESS) or a
    # multi-host Cloud TPU VM / Slurm job is detected; true: always; false: never.
    enabled: Optional[bool] = None
    coordinator: Optional[str] = None  # host:port of process 0 (JAX_COORDINATOR_ADDRESS)
    num_processes: Optional[int] = None  # JAX_NUM_PROCESSES
    process_id: Optional[int] = None  # JAX_PROCESS_ID
    init_timeout_s: int = 120  # all processes must have joined by then
    heartbeat_timeout_s: int = 20  # a silent peer stops the others after this long
    shutdown_timeout_s: int = 30

    def check(self) -> None:
        _positive("distributed", self, "init_timeout_s", "heartbeat_timeout_s",
                  "shutdown_timeout_s")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    peak_tflops: Optional[float] = None  # per device; None: looked up from the device kind
    tensorboard: bool = True  # event files in <output_dir>/tensorboard beside metrics.jsonl

    def check(self) -> None:
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"metrics.peak_tflops must be positive, got {self.peak_tflops}")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    # A jax.profiler trace of `steps` steps from step `start_step` (null: no trace), in
    # <output_dir>/tensorboard/plugins/profile (TensorBoard's profile tab, xprof).
    start_step: Optional[int] = None
    steps: int = 3

    def check(self) -> None:
        if self.start_step is not None and (self.start_step < 1 or self.steps < 1):
            raise ConfigError(f"profile.start_step={self.start_step}, profile.steps="
                              f"{self.steps}: both must be at least 1 (profile.start_step="
                              "null: no trace)")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    # `python -m train.serve`: decode slots run together, each with a KV cache of max_len
    # tokens (null: the model's max_seq_len; a request's prompt plus max_tokens must fit)
    max_batch: int = 8
    max_len: Optional[int] = None
    max_queue: int = 64  # requests waiting for a slot; one more is answered 429
    # decode steps per call of the device, fewer when a request reaches max_tokens
    # sooner (tokens stream in bursts of up to this many; new requests join between
    # calls): fewer host round trips per token
    decode_steps: int = 4
    prefill_rows: Optional[int] = None  # requests prefilled at once (null: batch ways)
    # a paged KV cache: kv_pages pages of page_size tokens that the max_batch rows share,
    # each request taking the pages its prompt and max_tokens need (0: each row has its
    # own max_len slots); kv_pages x page_size tokens must hold one max_len request
    kv_pages: int = 0
    page_size: int = 16
    drain_s: float = 30.0  # after SIGTERM, in-flight requests get this long to finish
    model_name: Optional[str] = None  # the id clients ask for; None: --checkpoint as given
    # int8: the layer projections' weights stored as int8 with a scale per output channel
    # (models/quantize.py); `python -m train.eval` then reports the eval loss both ways
    quantize: Optional[str] = None

    def check(self) -> None:
        if (self.max_batch < 1 or self.decode_steps < 1 or (self.prefill_rows or 1) < 1
                or self.max_queue < 0 or self.drain_s < 0):
            raise ConfigError(f"serve.max_batch={self.max_batch}, serve.decode_steps="
                              f"{self.decode_steps}, serve.prefill_rows={self.prefill_rows}, "
                              f"serve.max_queue={self.max_queue}, serve.drain_s="
                              f"{self.drain_s}: the first three must be at least 1, the "
                              "others at least 0")
        if self.kv_pages < 0 or self.page_size < 1:
            raise ConfigError(f"serve.kv_pages={self.kv_pages} and serve.page_size="
                              f"{self.page_size}: use kv_pages >= 0 (0: no pages) and "
                              "page_size >= 1")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"serve.max_len must be at least 2, got {self.max_len}")
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"serve.quantize={self.quantize!r} is not supported; use int8 "
                              "(weight-only) or null")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "default"
    output_dir: Optional[str] = None  # None: runs/<name>
    compile_cache_dir: Optional[str] = "~/.cache/shardlm/jax"  # null turns the cache off
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)

    @property
    def run_dir(self) -> str:
        return self.output_dir or f"runs/{self.name}"

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir.rstrip('/')}/checkpoints"


# ---------------------------------------------------------------- building from dicts


def _fields(cls) -> dict[str, Any]:
    """{field name: type hint} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in _fields(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def suggest(key: str) -> str | None:
    """The valid key a mistyped dotted `key` most likely meant: each part corrected to
    the closest name of its section (`trian.steps` -> `train.steps`), else the closest
    key overall (`seed` -> `train.seed`)."""
    cls, parts = Config, []
    for part in key.split("."):
        fields = _fields(cls) if cls is not None else {}
        name = part if part in fields else next(
            iter(difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)), None)
        if name is None:
            break
        parts.append(name)
        cls = fields[name] if dataclasses.is_dataclass(fields[name]) else None
    else:
        if cls is None and ".".join(parts) != key:
            return ".".join(parts)
    close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown(key: str, value: Any = None, where: str = "") -> ConfigError:
    """The error for an unknown `key`; under an unknown section, the first key inside it
    is named (`trian: {steps: 3}` is 'trian.steps'), which is what a user mistyped."""
    while isinstance(value, dict) and value:
        first = next(iter(value))
        key, value = f"{key}.{first}", value[first]
    close = suggest(key)
    hint = f"; did you mean {close!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


# Keys that are gone, with what took their place: an error in a user's file or
# override, dropped from the configs earlier versions saved beside their checkpoints.
REMOVED = {"checkpoint.load_params_only": (
    "checkpoint.load_params_only is gone: set model.init_from=PATH instead (a run, an "
    "export or hf:DIR; parameters only, a new optimizer state) and leave "
    "checkpoint.resume_from out")}


def check_keys(values: dict, where: str = "", cls=None, prefix: str = "") -> None:
    """Every key of a raw mapping (a YAML file, an override) names a config field."""
    cls = cls or Config
    fields = _fields(cls)
    for key, value in values.items():
        if prefix + key in REMOVED:
            raise ConfigError(REMOVED[prefix + key] + where.replace(" in ", " (in ", 1)
                              + (")" if where else ""))
        if key not in fields:
            raise _unknown(prefix + key, value, where)
        if dataclasses.is_dataclass(fields[key]) and isinstance(value, dict):
            check_keys(value, where, fields[key], f"{prefix}{key}.")


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            list: "a list", dict: "a mapping"}.get(origin or hint, str(hint))


def _coerce(value: Any, hint, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(hint):
            return value
    elif hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint in (str, list, dict) or origin in (list, dict):
        if isinstance(value, origin or hint):
            return value
    else:
        raise TypeError(f"unsupported type {hint} for {key}")
    raise ConfigError(f"{key}={value!r} is not allowed: expected {_describe(hint)}")


def _build(cls, values: dict, prefix: str = ""):
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if prefix + key in REMOVED:  # in a config an earlier version saved
            continue
        if key not in fields:
            raise _unknown(prefix + key, value)
        hint = fields[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + key} must be a mapping of keys, got {value!r}")
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


# ---------------------------------------------------------------- files and overrides


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory; name a YAML file in "
                          "it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not text (UTF-8 YAML)") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r}{where} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    return data


# Values that are mappings but replace an earlier value whole instead of merging into
# it: a rules table is one table (a later `{preset: tp}` must not keep names an earlier
# `{preset: fsdp, mlp: null}` set).
REPLACED_WHOLE = {("sharding", "rules")}


def merge(base: dict, top: dict, path: tuple[str, ...] = ()) -> dict:
    """`top` over `base`, section by section (mappings merge key by key)."""
    out = dict(base)
    for key, value in top.items():
        if (isinstance(value, dict) and isinstance(out.get(key), dict)
                and path + (key,) not in REPLACED_WHOLE):
            out[key] = merge(out[key], value, path + (key,))
        else:
            out[key] = value
    return out


def _resolve_base(name: str, relative_to: Path) -> Path:
    for candidate in (relative_to / name, CONFIG_DIR / name):
        if candidate.exists():
            return candidate
    raise ConfigError(f"base config {name!r} (named in {str(relative_to)!r}) not found")


def load_file(path: Path, _seen: tuple = ()) -> dict:
    """The merged raw mapping of `path` and its base configs; a key unknown to the
    schema is an error naming the file it is in."""
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"config {str(path)!r} names itself as a base (cycle)")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    check_keys(data, f" in {str(path)!r}")
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge(merged, load_file(_resolve_base(base, path.parent),
                                         _seen + (resolved,)))
    return merge(merged, data)


def parse_override(text: str) -> dict:
    """'mesh.data=2' -> {'mesh': {'data': 2}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML") from None
    out: dict = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def override_key(text: str) -> str:
    """The dotted key of a key=value override."""
    return text.split("=", 1)[0].strip()


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Config from a YAML file (default configs/default.yaml) and key=value overrides."""
    if path is None:
        path_obj = Path("configs/default.yaml")
        if not path_obj.exists():
            path_obj = CONFIG_DIR / "default.yaml"
    else:
        path_obj = Path(path)
    raw = load_file(path_obj)
    raw.setdefault("name", path_obj.stem)
    for text in overrides:
        check_keys(parse_override(text))
        raw = merge(raw, parse_override(text))
    from train.init_from import resolve  # reads model.init_from's source: import late
    return from_dict(resolve(raw))


def with_overrides(raw: dict, overrides: Sequence[str] = (),
                   keep: Callable[[str], bool] = lambda key: True) -> Config:
    """A validated Config from a raw mapping (a file's, or one saved beside a
    checkpoint) with the `overrides` whose key `keep` accepts applied on top."""
    for text in overrides:
        if keep(override_key(text)):
            raw = merge(raw, parse_override(text))
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    """A validated Config from a nested dict (e.g. one saved beside a checkpoint)."""
    cfg = _build(Config, raw)
    validate(cfg)
    return embedded_vocab(cfg)


def embedded_vocab(cfg: Config) -> Config:
    """The embedded data (stdlib bytes, synthetic tokens) has 256 tokens: the vocabulary
    size when the config leaves it open. With data.path the tokenizer decides, at
    the start of the run (train.data.resolve_vocab)."""
    if cfg.model.vocab_size is None and cfg.data.path is None:
        return with_vocab(cfg, 256)
    return cfg


def with_vocab(cfg: Config, vocab_size: int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))


def validate(cfg: Config) -> None:
    """Every section's own checks, then those that span sections; no devices needed."""
    try:
        cfg.model.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for section in (cfg.mesh, cfg.optimizer, cfg.train, cfg.dpo, cfg.privacy, cfg.data,
                    cfg.eval, cfg.checkpoint, cfg.distributed, cfg.metrics, cfg.profile, cfg.serve):
        section.check()
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len="
                          f"{cfg.model.max_seq_len}")
    if (cfg.data.path is None and cfg.data.source == "stdlib"
            and cfg.model.vocab_size is not None and cfg.model.vocab_size < 256):
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is too small for the "
                          "byte-level stdlib corpus: it needs at least 256")
    if cfg.train.objective == "dpo" and cfg.data.path is None:
        raise ConfigError("train.objective=dpo trains on preference pairs: set data.path to "
                          "rows of prompt, chosen and rejected")
    cfg.privacy.check_run(cfg)
    _not_s3("output_dir", cfg.output_dir)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the resolved config (for YAML beside the run)."""
    return dataclasses.asdict(cfg)
