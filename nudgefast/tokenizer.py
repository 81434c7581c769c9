"""Tokenizer wrapper: tokenizer.json through `tokenizers`, chat templates through jinja2, the
word-start table and the stop ids of DESIGN.md section 1."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
WORD_START_PREFIXES = ("\u0120", "\u2581", " ")  # "Ġ" (byte-level BPE), "▁" (SentencePiece), plain space


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # transformers writes AddedToken dicts
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{model_dir} has no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        cfg_path = model_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        if self.chat_template is None and (model_dir / "chat_template.jinja").is_file():
            self.chat_template = (model_dir / "chat_template.jinja").read_text()
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos = bool(self.config.get("add_bos_token", False))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._word_start: dict[int, torch.Tensor] = {}

    # ---- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's own rules: its post-processor, plus a BOS where tokenizer_config asks
        for one and the post-processor did not add it."""
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=False)

    def token_string(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    # ---- the pieces of the nudging rule ----------------------------------------------------
    def word_start_table(self, size: int) -> torch.Tensor:
        """bool [size]: token id begins a word. Ids past the vocabulary (embedding padding rows)
        are not word starts."""
        cached = self._word_start.get(size)
        if cached is not None:  # a Python pass over a 262k vocabulary costs ~0.7 s: once per size
            return cached.clone()
        table = torch.zeros(size, dtype=torch.bool)
        for i in range(min(size, self.vocab_size)):
            s = self.tok.id_to_token(i)
            if s is not None and s.startswith(WORD_START_PREFIXES):
                table[i] = True
        self._word_start[size] = table
        return table.clone()

    def end_of_turn_id(self) -> int | None:
        for t in END_OF_TURN_TOKENS:
            i = self.tok.token_to_id(t)
            if i is not None:
                return i
        return None

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        if self.vocab_size != other.vocab_size:
            return False
        return self.tok.get_vocab(with_added_tokens=True) == other.tok.get_vocab(with_added_tokens=True)

    # ---- prompts ---------------------------------------------------------------------------
    def _compiled_template(self):
        """The chat template, compiled once (compiling costs milliseconds: a server renders it per
        request)."""
        if getattr(self, "_template", None) is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
            self._template = env.from_string(self.chat_template)
        return self._template

    def render_chat(self, system_prompt: str, question: str, answer_prefix: str) -> str:
        """The nudger's prompt: its chat template with a system and a user turn, the assistant turn
        opened, then answer_prefix. A template that refuses a system role gets the system text
        prepended to the user turn."""
        if not self.chat_template:
            raise ConfigError("the nudger's tokenizer_config.json has no chat_template; nudging needs the "
                              "aligned model's chat format (add a chat_template, or use mode='base_only')")
        import jinja2

        template = self._compiled_template()
        specials = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        with_system = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
        try:
            text = template.render(messages=with_system, add_generation_prompt=True, **specials)
        except jinja2.TemplateError:
            merged = f"{system_prompt}\n\n{question}" if system_prompt else question
            text = template.render(messages=[{"role": "user", "content": merged}], add_generation_prompt=True,
                                   **specials)
        return text + answer_prefix
