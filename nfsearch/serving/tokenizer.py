"""Tokenizers for the server: the checkpoint's own (HuggingFace), or a byte-level one for random weights.

ByteTokenizer: token id = byte value (0-255) of the UTF-8 text, so any text round-trips exactly. Ids
the model may sample above 255 (a random model with a larger vocabulary) decode to U+FFFD, one
character each. Its eos is the model's eos ids. Its chat template (also the fallback for a folder whose
tokenizer has none) is FALLBACK_CHAT_TEMPLATE: each message as "<|role|>\\ncontent\\n", then
"<|assistant|>\\n" to prompt the reply.

Detokenizer turns the ids streamed so far into new text: it re-decodes the whole output and emits the
new suffix, holding back a tail that ends in an incomplete character (U+FFFD) until it completes.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from nfsearch.errors import NfsearchError

FALLBACK_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
FALLBACK_GENERATION_PROMPT = "<|assistant|>\n"


def fallback_chat_prompt(messages: list[dict]) -> str:
    return "".join(FALLBACK_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) \
        + FALLBACK_GENERATION_PROMPT


class ByteTokenizer:
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                pending.append(i)
            else:
                out.append(pending.decode("utf-8", "replace"))
                pending.clear()
                out.append("\ufffd")
        out.append(pending.decode("utf-8", "replace"))
        return "".join(out)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(fallback_chat_prompt(messages))


class HFTokenizer:
    """A checkpoint folder's tokenizer through transformers (its chat template when it has one)."""

    def __init__(self, folder: Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise NfsearchError("a checkpoint's tokenizer needs transformers (pip install transformers)") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001 -- transformers raises many kinds; one line for the user
            raise NfsearchError(f"{folder}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
        self.name = str(folder)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tok.encode(fallback_chat_prompt(messages), add_special_tokens=False)


def load_tokenizer(model: str) -> ByteTokenizer | HFTokenizer:
    """The folder's tokenizer when `model` is a folder with tokenizer files, else bytes."""
    folder = Path(model)
    if folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                               "tokenizer.model")):
        return HFTokenizer(folder)
    return ByteTokenizer()


class Detokenizer:
    """New text for each batch of streamed ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""                 # emitted so far
        self._bytes = isinstance(tokenizer, ByteTokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, new_ids: list[int], is_final: bool = False) -> str:
        self.ids.extend(new_ids)
        if self._bytes:                # linear: bytes through an incremental UTF-8 decoder
            parts = []
            for i in new_ids:
                if 0 <= i < 256:
                    parts.append(self._utf8.decode(bytes([i])))
                else:
                    parts.append(self._utf8.decode(b"", final=True) + "\ufffd")
            if is_final:
                parts.append(self._utf8.decode(b"", final=True))
            new = "".join(parts)
        else:
            full = self.tokenizer.decode(self.ids)
            if full.endswith("\ufffd") and not is_final:
                return ""              # an incomplete character: wait for its next bytes
            new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += new
        return new
