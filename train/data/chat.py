"""Chat data for supervised fine-tuning: conversations rendered with the model's own chat
template, tokenized, and weighted so that only the assistant's tokens are trained on.

Rows (JSONL lines, Parquet rows): {"messages": [{"role", "content"}, ...]}, or TRL's
prompt-completion form {"prompt", "completion"}: two strings are concatenated as they
are (the tokenizer's own special tokens, e.g. Llama's BOS, then EOS after the
completion), two message lists are rendered with the template; the completion is
trained on.

The template is the one `transformers` saves beside the tokenizer (chat_template.jinja,
or "chat_template" in tokenizer_config.json), rendered by Jinja2 in a sandbox as
`apply_chat_template` renders it, and the text tokenized without adding special tokens
(templates write their own BOS). Official templates mark no assistant spans
({% generation %}), so they are found by rendering: assistant message i's text is what
the conversation up to and including it adds to the conversation before it with the
generation prompt (its content and end-of-turn tokens). Templates that render earlier
turns differently from the last one (Qwen3 drops past reasoning) give one example per
assistant turn instead, each in the context the model sees when it writes that turn.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from train.errors import DataError

ROLES = ("system", "user", "assistant", "tool", "developer")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant markers) render
    their body as it is: spans are found by rendering, whatever the markers say."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _token(value) -> str | None:
    """A special token of tokenizer_config.json: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


@dataclasses.dataclass
class ChatTemplate:
    source: str  # the Jinja text
    where: str  # the file it came from, for messages
    special: dict[str, str]  # bos_token, eos_token, ... as the template sees them

    def __post_init__(self):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _Generation])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.compiled = env.from_string(self.source)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"the chat template in {self.where} is not valid Jinja ({e})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               where: str = "") -> str:
        try:
            return self.compiled.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"{where}: the chat template of {self.where} refuses the "
                            f"conversation ({e})") from None


def load_template(tokenizer_path: str) -> ChatTemplate | None:
    """The chat template saved beside a tokenizer.json (chat_template.jinja, else
    tokenizer_config.json's "chat_template", the "default" one of a list), or None."""
    directory = Path(tokenizer_path).parent
    config: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{config_path} is not valid JSON") from None
    special = {k: _token(config[k]) for k in ("bos_token", "eos_token", "pad_token",
                                              "unk_token") if _token(config.get(k))}
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(), str(jinja), special)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return ChatTemplate(template, str(config_path), special)
    return None


def save_template(template: ChatTemplate | None, directory: Path) -> str | None:
    """A copy of the template in `directory` (chat_template.jinja); its name, or None."""
    if template is None:
        return None
    (Path(directory) / "chat_template.jinja").write_text(template.source)
    path = Path(template.where).parent / "tokenizer_config.json"
    if path.is_file():  # the special tokens the template reads
        (Path(directory) / "tokenizer_config.json").write_bytes(path.read_bytes())
    return "chat_template.jinja"


@dataclasses.dataclass
class Example:
    """Token ids and a 0/1 loss weight per token (1: trained on)."""
    ids: np.ndarray  # (n,) int
    weights: np.ndarray  # (n,) uint8


class ChatEncoder:
    """Rows -> examples, with a Hugging Face tokenizer (character offsets place each
    token inside or outside the trained spans) and the template beside it."""

    def __init__(self, tokenizer, template: ChatTemplate | None):
        if getattr(tokenizer, "kind", None) != "hf":
            raise DataError("chat data needs a Hugging Face tokenizer.json with a chat template "
                            f"(data.tokenizer is {getattr(tokenizer, 'path', 'byte')!r})")
        self.tok, self.template = tokenizer, template
        self.per_turn = 0  # conversations given one example per assistant turn
        self.special_ids = {i for i, t in tokenizer.tok.get_added_tokens_decoder().items()
                            if t.special}

    def encode(self, row: dict, where: str) -> list[Example]:
        if "messages" in row:
            messages = _messages(row["messages"], where, "messages")
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: the conversation has no assistant message (nothing "
                                "to train on)")
            return [self._example(text, spans, False) for text, spans in
                    self._spans(messages, where)]
        return [self._completion(row["prompt"], row["completion"], where, "completion")]

    def encode_pair(self, row: dict, where: str) -> list[Example]:
        """A preference row (DPO): [prompt + chosen, prompt + rejected], each encoded as
        a prompt-completion row (the completion trained on)."""
        missing = [f for f in ("prompt", "chosen", "rejected") if f not in row]
        if missing:
            raise DataError(f"{where}: a preference row needs 'prompt', 'chosen' and "
                            f"'rejected'; it has no {', '.join(repr(f) for f in missing)} "
                            f"(has: {', '.join(row)})")
        return [self._completion(row["prompt"], row[f], where, f) for f in ("chosen", "rejected")]

    def _completion(self, prompt, completion, where: str, field: str) -> Example:
        """A prompt and its completion (strings or message lists), the completion trained
        on; `field` names the completion's field in messages."""
        if isinstance(prompt, str) and isinstance(completion, str):
            return self._example(prompt + completion, [(len(prompt), len(prompt + completion))],
                                 True)
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt = _messages(prompt, where, "prompt")
            whole = prompt + _messages(completion, where, field)
            before = self._render(prompt, True, where)
            text = self._render(whole, False, where)
            if not text.startswith(before):
                raise DataError(f"{where}: the chat template renders the prompt differently "
                                f"before and after the {field}; give the rows as messages")
            return self._example(text, [(len(before), len(text))], False)
        raise DataError(f"{where}: 'prompt' and {field!r} must both be strings or both "
                        f"message lists (got {type(prompt).__name__} and "
                        f"{type(completion).__name__})")

    def _render(self, messages, add_generation_prompt, where):
        if self.template is None:
            raise DataError(f"{where}: conversations need the model's chat template, and "
                            f"{self.tok.path} has none beside it (chat_template.jinja or "
                            "tokenizer_config.json's chat_template)")
        return self.template.render(messages, add_generation_prompt, where)

    def _spans(self, messages, where) -> list[tuple[str, list[tuple[int, int]]]]:
        """[(text, trained character spans)]: the conversation with every assistant turn
        marked, or, where the template rewrites earlier turns, one text per turn."""
        turns = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                before = self._render(messages[:i], True, where)
                upto = self._render(messages[:i + 1], False, where)
                if not upto.startswith(before):
                    raise DataError(f"{where}: the chat template does not begin assistant "
                                    f"message {i} with its generation prompt, so its tokens "
                                    "cannot be told from the prompt's")
                turns.append((before, upto))
        text = self._render(messages, False, where)
        if all(text.startswith(upto) for _, upto in turns):
            return [(text, [(len(b), len(u)) for b, u in turns])]
        self.per_turn += 1
        return [(upto, [(len(before), len(upto))]) for before, upto in turns]

    def _example(self, text: str, spans, plain: bool) -> Example:
        """Tokens of `text` (plain strings: the tokenizer's own special tokens and EOS
        after; rendered templates: none added) weighted 1 where they start inside a
        span."""
        enc = self.tok.tok.encode(text, add_special_tokens=plain)
        starts = np.array([a for a, _ in enc.offsets] or [0], np.int64)[:len(enc.ids)]
        weights = np.zeros(len(enc.ids), np.uint8)
        for a, b in spans:
            weights |= ((starts >= a) & (starts < b)).astype(np.uint8)
        if plain:
            # the tokenizer's own special tokens (offsets (0, 0)) are never trained on
            special = np.array([i in self.special_ids for i in enc.ids], bool)
            weights[special] = 0
        ids = np.asarray(enc.ids, np.int64)
        if plain:
            ids, weights = np.append(ids, self.tok.eos_id), np.append(weights, np.uint8(1))
        return Example(ids, weights)


def _messages(value, where: str, field: str) -> list[dict]:
    """`value` as a list of {"role", "content"} messages, or a DataError naming it."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {field}[{i}] must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has role {m['role']!r}; allowed: "
                            f"{', '.join(ROLES)}")
        out.append(m)
    return out


def row_kind(row: dict) -> str | None:
    """'chat' for a conversation or a prompt-completion row, 'text' for a text row,
    'preference' for a DPO row, None for anything else."""
    if "messages" in row or ("prompt" in row and "completion" in row):
        return "chat"
    if "chosen" in row and "rejected" in row:
        return "preference"
    return None
