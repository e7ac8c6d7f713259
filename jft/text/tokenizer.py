"""Tokenizers for Hugging Face checkpoint folders and GGUF files.

The reference is transformers: for the same checkpoint, `encode`, `decode` and the chat template
give what `AutoTokenizer` gives, token for token. A folder's `tokenizer.json` is run by the
`tokenizers` library as written; a lone sentencepiece `tokenizer.model` is run by sentencepiece
itself. A GGUF file only stores its vocabulary, so the pipeline around it is rebuilt the way
transformers rebuilds it (`integrations/gguf/gguf_tokenizer_mapping.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from jft.errors import JftError
from jft.text.chat_template import render

# Tokens that end an assistant turn in the common chat formats; generation stops on any of them.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
)
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_EXTRA_SPECIAL_TOKENS = ("additional_special_tokens", "extra_special_tokens")


class _Backend(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class Tokenizer:
    """Text to token ids and back for one checkpoint, plus its chat template."""

    def __init__(
        self,
        backend: _Backend,
        special_tokens: Mapping[str, str | None],
        chat_template: str | None,
        chat_template_source: str | None = None,
    ):
        self._backend = backend
        self._special_tokens = {name: token for name, token in special_tokens.items() if token}
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.pad_id = self._special_id("pad_token")
        turn_ends = (backend.token_to_id(token) for token in _END_OF_TURN_TOKENS)
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.eos_id, *turn_ends) if i is not None))
        # Asking the backend covers every way a checkpoint can ask for BOS: its flags, or a
        # post-processor in tokenizer.json that adds one unconditionally (Llama 3).
        self.add_bos = self.bos_id is not None and backend.encode("", True)[:1] == [self.bos_id]
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        self.vocab_size = backend.vocab_size

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template; `chat_template_source` names where it came from (a file, a
        GGUF key), for errors. Setting a template forgets the old one's source."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template
        self.chat_template_source = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids."""
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (any iterable of integers, such as a numpy array)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as one prompt string by the checkpoint's chat template."""
        if self.chat_template is None:
            raise JftError(
                "this checkpoint has no chat template (tokenizer_config.json chat_template, "
                "chat_template.jinja or GGUF tokenizer.chat_template); use a model that has one"
            )
        tokens = dict(self._special_tokens)
        return render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tokens.pop("bos_token", None),
            eos_token=tokens.pop("eos_token", None),
            source=self.chat_template_source,
            **tokens,
        )

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer | None:
        """The underlying `tokenizers.Tokenizer` (None for a SentencePiece tokenizer.model)."""
        return getattr(self._backend, "_tokenizer", None)

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, pad_token, unk_token, ... as their token strings."""
        return dict(self._special_tokens)

    def save_hf(self, directory: Path) -> None:
        """tokenizer.json and tokenizer_config.json (special tokens, chat template), which
        transformers' PreTrainedTokenizerFast loads: for tokenizers that came from GGUF."""
        if self.hf_tokenizer is None:
            raise JftError("a SentencePiece tokenizer.model tokenizer is only copied, not "
                           "rewritten; export from its HF directory")
        self.hf_tokenizer.save(str(Path(directory) / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._special_tokens,
                  "chat_template": self.chat_template}
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    def _special_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)


class _TokenizersBackend:
    """A `tokenizers.Tokenizer`; its post-processor decides which special tokens encode adds."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


class _SentencePieceBackend:
    """A sentencepiece model, with special tokens in the text matched whole, as transformers does.

    sentencepiece never matches control symbols such as `<s>` in text, so the text is cut at the
    special tokens first and each piece between them is encoded on its own.
    """

    def __init__(
        self,
        processor: sentencepiece.SentencePieceProcessor,
        special_tokens: Iterable[str],
        prefix: list[int],
        suffix: list[int],
    ):
        self._processor = processor
        # A token the model lacks would need an id without an embedding, so it stays plain text.
        self._special_ids = {
            token: token_id
            for token in special_tokens
            if (token_id := _piece_id(processor, token)) is not None
        }
        self._special_id_set = set(self._special_ids.values())
        longest_first = sorted(self._special_ids, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self._prefix = prefix
        self._suffix = suffix
        self.vocab_size = processor.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = []
        # With a capturing group, split gives text, special, text, special, ..., text.
        parts = self._splitter.split(text) if self._special_ids else [text]
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._processor.encode(part))
        return [*self._prefix, *ids, *self._suffix] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces, run = [], []
        for token_id in ids:
            if token_id not in self._special_id_set:
                run.append(token_id)
            elif not skip_special_tokens:
                pieces += [self._processor.decode(run), self._processor.id_to_piece(token_id)]
                run = []
        pieces.append(self._processor.decode(run))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        return _piece_id(self._processor, token)


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoint folders


def load_tokenizer_from_dir(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint folder.

    Uses tokenizer.json when present, else the sentencepiece tokenizer.model, with the special
    tokens named in tokenizer_config.json and special_tokens_map.json. BOS and EOS follow
    tokenizer.json's post-processor, or for a tokenizer.model the add_bos_token / add_eos_token
    flags (off when absent), as in transformers.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise JftError(f"{directory}: not a directory; expected a checkpoint folder")
    config_path = directory / "tokenizer_config.json"
    config = _read_json_object(config_path)
    tokens_map_path = directory / "special_tokens_map.json"
    # special_tokens_map.json wins over tokenizer_config.json, as in transformers.
    settings = {**config, **_read_json_object(tokens_map_path)}
    special_tokens = {
        name: _token_content(settings.get(name), f"{config_path} {name}")
        for name in _NAMED_SPECIAL_TOKENS
    }
    extra_tokens = [
        _token_content(token, f"{config_path} {key}")
        for key in _EXTRA_SPECIAL_TOKENS
        for token in _token_list(settings.get(key), f"{config_path} {key}")
    ]
    template, template_source = _dir_chat_template(directory, config)

    if (directory / "tokenizer.json").is_file():
        backend = _tokenizer_json_backend(
            directory / "tokenizer.json", [*special_tokens.values(), *extra_tokens]
        )
    elif (directory / "tokenizer.model").is_file():
        backend, special_tokens = _sentencepiece_backend(
            directory / "tokenizer.model",
            special_tokens,
            extra_tokens,
            add_bos=_flag(config, "add_bos_token", config_path),
            add_eos=_flag(config, "add_eos_token", config_path),
        )
    else:
        raise JftError(
            f"{directory}: no tokenizer.json or tokenizer.model; a checkpoint folder needs one"
        )
    return Tokenizer(backend, special_tokens, template, template_source)


def _tokenizer_json_backend(path: Path, special_tokens: list[str | None]) -> _TokenizersBackend:
    """tokenizer.json as written: its post-processor alone decides BOS and EOS.

    transformers ignores tokenizer_config.json's add_bos_token / add_eos_token when a
    tokenizer.json exists, so they are ignored here too.
    """
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for any unreadable file
        raise JftError(f"{path}: not a valid tokenizers file ({_one_line(error)})") from error
    _register_special_tokens(tokenizer, special_tokens)
    return _TokenizersBackend(tokenizer)


def _sentencepiece_backend(
    path: Path,
    special_tokens: dict[str, str | None],
    extra_tokens: list[str],
    add_bos: bool,
    add_eos: bool,
) -> tuple[_SentencePieceBackend, dict[str, str | None]]:
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as error:
        raise JftError(f"{path}: not a valid sentencepiece model ({_one_line(error)})") from error
    # The model names its own special pieces; the config may rename them.
    own_ids = {
        "bos_token": processor.bos_id(),
        "eos_token": processor.eos_id(),
        "unk_token": processor.unk_id(),
        "pad_token": processor.pad_id(),
    }
    special_tokens = dict(special_tokens)
    for name, piece_id in own_ids.items():
        if special_tokens[name] is None and piece_id >= 0:
            special_tokens[name] = processor.id_to_piece(piece_id)
    controls = [
        processor.id_to_piece(i)
        for i in range(processor.get_piece_size())
        if processor.is_control(i)
    ]
    prefix = _piece_ids(processor, [special_tokens["bos_token"]] if add_bos else [])
    suffix = _piece_ids(processor, [special_tokens["eos_token"]] if add_eos else [])
    specials = [*controls, *(t for t in special_tokens.values() if t), *extra_tokens]
    return _SentencePieceBackend(processor, specials, prefix, suffix), special_tokens


def _piece_ids(
    processor: sentencepiece.SentencePieceProcessor, tokens: list[str | None]
) -> list[int]:
    """The ids of those tokens that are pieces of the model."""
    ids = (_piece_id(processor, token) for token in tokens if token is not None)
    return [i for i in ids if i is not None]


def _piece_id(processor: sentencepiece.SentencePieceProcessor, token: str) -> int | None:
    token_id = processor.piece_to_id(token)
    # sentencepiece answers the unknown token's id for a piece it does not have.
    return token_id if processor.id_to_piece(token_id) == token else None


def _dir_chat_template(directory: Path, config: dict) -> tuple[str | None, str | None]:
    """chat_template.jinja, else tokenizer_config.json's, else chat_template.json's: the
    template and the file it came from."""
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    config_path = directory / "tokenizer_config.json"
    template = _template_value(config.get("chat_template"), config_path)
    if template is not None:
        return template, str(config_path)
    json_path = directory / "chat_template.json"
    template = _template_value(_read_json_object(json_path).get("chat_template"), json_path)
    return template, None if template is None else str(json_path)


def _template_value(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates, [{"name": ..., "template": ...}]
        named = {
            entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)
        }
        if isinstance(named.get("default"), str):
            return named["default"]
    raise JftError(
        f'{path}: chat_template must be a string or a list of {{"name", "template"}} objects '
        'with a "default" entry'
    )


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JftError(f"{path}: not valid JSON ({_one_line(error)})") from error
    if not isinstance(value, dict):
        raise JftError(f"{path}: expected a JSON object at the top level")
    return value


def _token_content(value: Any, source: str) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise JftError(f'{source}: expected a token string or an object with a "content" string')


def _token_list(value: Any, source: str) -> list:
    if value is None:
        return []
    if isinstance(value, dict):  # newer files map names to tokens
        return list(value.values())
    if isinstance(value, list):
        return value
    raise JftError(f"{source}: expected a list of tokens")


def _flag(config: dict, key: str, path: Path) -> bool:
    value = config.get(key, False)
    if isinstance(value, bool):
        return value
    raise JftError(f"{path}: {key} must be true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------
# GGUF files

# llama.cpp's token types.
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# How text is cut into words before byte-level BPE, by `tokenizer.ggml.pre`. Any other value
# (such as "smollm" or "gpt2") keeps GPT-2's own split.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        (
            *("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0"),
            *("lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"),
        ),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def load_tokenizer_from_gguf(
    metadata: Mapping[str, Any], path: str | Path | None = None
) -> Tokenizer:
    """The tokenizer embedded in a GGUF file's metadata (`GGUFFile.metadata`); `path`, the
    file's, names its chat template in errors."""
    model = _gguf_value(metadata, "tokenizer.ggml.model", str)
    tokens = _gguf_value(metadata, "tokenizer.ggml.tokens", list)
    if model is None or tokens is None:
        raise JftError(
            "GGUF file has no tokenizer.ggml.model / tokenizer.ggml.tokens metadata, "
            "so it carries no tokenizer; load the tokenizer from a checkpoint folder instead"
        )
    if model == "gpt2":
        tokenizer = _gguf_byte_level_bpe(metadata, tokens)
    elif model == "llama":
        tokenizer = _gguf_sentencepiece_bpe(metadata, tokens)
    else:
        raise JftError(
            f"GGUF tokenizer.ggml.model is {model!r}; supported: 'gpt2' (byte-level BPE) "
            "and 'llama' (sentencepiece)"
        )
    _add_gguf_added_tokens(tokenizer, metadata, tokens, byte_level=model == "gpt2")

    special_tokens = {
        name: _gguf_token(metadata, tokens, f"tokenizer.ggml.{key}")
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    _register_special_tokens(tokenizer, special_tokens.values())
    # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
    add_bos = _gguf_value(metadata, "tokenizer.ggml.add_bos_token", bool)
    add_bos = model == "llama" if add_bos is None else add_bos
    add_eos = _gguf_value(metadata, "tokenizer.ggml.add_eos_token", bool) or False
    tokenizer.post_processor = _bos_eos_processor(
        tokenizer,
        special_tokens["bos_token"] if add_bos else None,
        special_tokens["eos_token"] if add_eos else None,
    )
    template = _gguf_value(metadata, "tokenizer.chat_template", str)
    source = f"{path or 'GGUF metadata'} tokenizer.chat_template" if template else None
    return Tokenizer(_TokenizersBackend(tokenizer), special_tokens, template, source)


def _gguf_byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE, with the word split named by `tokenizer.ggml.pre`."""
    merges = _gguf_value(metadata, "tokenizer.ggml.merges", list)
    if merges is None:
        raise JftError("GGUF tokenizer.ggml.model is 'gpt2' but tokenizer.ggml.merges is missing")
    byte_chars = _byte_level_chars()
    alphabet = set(byte_chars)
    # Every token should be spelled in the byte alphabet; llama.cpp writes a few in plain UTF-8.
    vocab = {
        token if set(token) <= alphabet else "".join(byte_chars[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }
    tokenizer = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=[tuple(merge.split(" ")) for merge in merges],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(_gguf_value(metadata, "tokenizer.ggml.pre", str))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _gguf_sentencepiece_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    """A sentencepiece vocabulary as BPE with byte fallback, the way transformers converts it."""
    architecture = _gguf_value(metadata, "general.architecture", str)
    if architecture in _GEMMA_ARCHITECTURES:
        return _gemma_bpe(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _gguf_value(metadata, "tokenizer.ggml.merges", list)
    if merges is None:
        scores = _gguf_value(metadata, "tokenizer.ggml.scores", list)
        if scores is None or len(scores) != len(tokens):
            raise JftError(
                "GGUF sentencepiece vocabulary needs tokenizer.ggml.merges or one "
                "tokenizer.ggml.scores entry per token"
            )
        ranked = _derive_merges(vocab, dict(zip(tokens, scores, strict=True)))
    else:
        ranked = [tuple(merge.split(" ")) for merge in merges]
    tokenizer = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=ranked, fuse_unk=True, byte_fallback=True)
    )
    if architecture == "phi3":
        # Phi-3 prefixes "▁" to every piece of text, not only to the first one.
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=False
        )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tokenizer


def _gemma_bpe(tokens: list[str]) -> tokenizers.Tokenizer:
    """Gemma: no prefix space, and merges rebuilt from the order of the vocabulary."""
    # Gemma files store the tokens made of two or more spaces as real spaces, while the model
    # looks them up as "▁▁"; the merges must be built from the looked-up spelling.
    spelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    # Gemma's scores do not follow its merge order; the file order does.
    order = {token: -index for index, token in enumerate(spelled)}
    tokenizer = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=_derive_merges(vocab, order),
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def _derive_merges(
    vocab: Mapping[str, int], priority: Mapping[str, float]
) -> list[tuple[str, str]]:
    """The BPE merges implied by a vocabulary that lists none.

    Every cut of a token into two tokens is a merge. Merges building a higher-priority token come
    first; for one token, the cut with the longer left part first; remaining ties keep the
    vocabulary's order. This is transformers' rule, which the reference tokenizer follows.
    """
    ranked = []
    for token, score in priority.items():
        cuts = [(token[:i], token[i:]) for i in range(1, len(token))]
        cuts = [(left, right) for left, right in cuts if left in vocab and right in vocab]
        cuts.sort(key=lambda cut: (vocab[cut[0]], vocab[cut[1]]))
        ranked += [((-score, -len(left), -len(right)), left, right) for left, right in cuts]
    ranked.sort(key=lambda entry: entry[0])  # stable, so ties keep their order
    return [(left, right) for _, left, right in ranked]


def _add_gguf_added_tokens(
    tokenizer: tokenizers.Tokenizer,
    metadata: Mapping[str, Any],
    tokens: list[str],
    byte_level: bool,
) -> None:
    """Control tokens become special tokens, user-defined ones plain added tokens.

    Both are matched whole in text, as llama.cpp does. In a byte-level vocabulary a control token
    spelled outside the byte alphabet is a llama.cpp mislabel, and adding it would grow the
    vocabulary past the model's embedding, so it is skipped.
    """
    token_types = _gguf_value(metadata, "tokenizer.ggml.token_type", list) or []
    alphabet = set(_byte_level_chars()) if byte_level else None
    control = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    tokenizer.add_special_tokens(control)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _USER_DEFINED and token in vocab
    ]
    tokenizer.add_tokens(user_defined)


def _gguf_value(metadata: Mapping[str, Any], key: str, kind: type) -> Any:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, kind):
        raise JftError(f"GGUF metadata {key} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _gguf_token(metadata: Mapping[str, Any], tokens: list[str], key: str) -> str | None:
    token_id = _gguf_value(metadata, key, int)
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise JftError(f"GGUF metadata {key} is {token_id}, outside the {len(tokens)}-token vocab")
    return tokens[token_id]


def _bos_eos_processor(
    tokenizer: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """Adds BOS before and EOS after the text, each only when given (and already in the vocab)."""
    ids = {token: tokenizer.token_to_id(token) for token in (bos, eos) if token is not None}
    single = [*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])]
    return processors.TemplateProcessing(single=single, special_tokens=list(ids.items()))


@lru_cache(maxsize=1)
def _byte_level_chars() -> tuple[str, ...]:
    """GPT-2's spelling of each byte: printable ones as themselves, the rest shifted past 255."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return tuple(chars)


# ---------------------------------------------------------------------------------------------
# Shared


def _register_special_tokens(tokenizer: tokenizers.Tokenizer, tokens: Iterable[str | None]) -> None:
    """Marks named special tokens special, as transformers does, unless already added tokens.

    A token that is already an added token keeps its own flags (such as lstrip).
    """
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing = dict.fromkeys(t for t in tokens if t and t not in added)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
