"""lowrank_op.circuits.vocab: token strings from tokenizer.json and vocab.txt; their display form."""

import csv
import ast
import io
import json
from pathlib import Path

import pytest

from lowrank_op.circuits import vocab
from lowrank_op.errors import CheckpointError




def gpt2_byte_chars():
    """The byte-level BPE alphabet, written out independently: byte -> character."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {}
    extra = 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level(text):
    """``text`` spelled as byte-level BPE spells it."""
    chars = gpt2_byte_chars()
    return "".join(chars[b] for b in text.encode("utf-8"))


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


BPE_TOKENIZER = {
    "version": "1.0",
    "added_tokens": [
        {"id": 0, "content": "<|endoftext|>", "special": True},
        {"id": 9, "content": "<|im_start|>", "special": True},
        {"id": 12, "content": "<|im_end|>", "special": True},
    ],
    "pre_tokenizer": {"type": "ByteLevel"},
    "model": {
        "type": "BPE",
        "vocab": {"<|endoftext|>": 0, "h": 1, "e": 2, "Ġ": 3, "Ċ": 4, "Ġhello": 5, "âĢ": 6, "Ķ": 7},
        "merges": ["Ġ h", "h e"],
    },
}


# --- Reading --------------------------------------------------------------------------------------
def test_bpe_tokenizer_json_with_added_tokens_and_gaps(tmp_path):
    tokens = vocab.tokens_from_tokenizer_json(write_json(tmp_path / "tokenizer.json", BPE_TOKENIZER))
    assert tokens == [
        "<|endoftext|>", "h", "e", "Ġ", "Ċ", "Ġhello", "âĢ", "Ķ",
        "<unassigned:8>", "<|im_start|>", "<unassigned:10>", "<unassigned:11>", "<|im_end|>",
    ]
    assert vocab.GAP_TOKEN.format(id=10) == tokens[10]


def test_added_token_content_wins_at_a_shared_id(tmp_path):
    data = {"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 1, "content": "<B>"}]}
    assert vocab.tokens_from_tokenizer_json(write_json(tmp_path / "t.json", data)) == ["a", "<B>"]


def test_unigram_tokenizer_json(tmp_path):
    data = {
        "model": {"type": "Unigram", "unk_id": 2, "vocab": [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["▁the", -3.1], ["日本", -9.5]]},
        "added_tokens": [{"id": 0, "content": "<pad>"}, {"id": 6, "content": "<extra_id_0>"}],
    }
    tokens = vocab.tokens_from_tokenizer_json(write_json(tmp_path / "tokenizer.json", data))
    assert tokens == ["<pad>", "</s>", "<unk>", "▁the", "日本", "<unassigned:5>", "<extra_id_0>"]


def test_wordpiece_tokenizer_json_and_empty_vocab(tmp_path):
    data = {"model": {"type": "WordPiece", "vocab": {"[PAD]": 0, "[UNK]": 1, "##ing": 2, "café": 3}}}
    assert vocab.tokens_from_tokenizer_json(write_json(tmp_path / "a.json", data)) == ["[PAD]", "[UNK]", "##ing", "café"]
    assert vocab.tokens_from_tokenizer_json(write_json(tmp_path / "b.json", {"model": {"vocab": {}}})) == []


def test_vocab_txt(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes("[PAD]\n[UNK]\n\n##s\ncafé\n".encode("utf-8"))
    assert vocab.tokens_from_vocab_txt(path) == ["[PAD]", "[UNK]", "", "##s", "café"]
    path.write_bytes(b"\xef\xbb\xbf[PAD]\r\n[UNK]\r\nlast")  # a byte-order mark, CRLF, no final newline
    assert vocab.tokens_from_vocab_txt(path) == ["[PAD]", "[UNK]", "last"]
    path.write_bytes(b"a\x0bb\x0cc\xe2\x80\xa8d\n")  # only \n, \r\n and \r end lines
    assert vocab.tokens_from_vocab_txt(path) == ["a\x0bb\x0cc\u2028d"]
    path.write_bytes(b"")
    assert vocab.tokens_from_vocab_txt(path) == []


def test_read_vocab_looks_beside_the_checkpoint(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert vocab.read_vocab(tmp_path) is None and vocab.read_vocab(weights) is None
    (tmp_path / "vocab.txt").write_text("x\ny\n", encoding="utf-8")
    assert vocab.read_vocab(weights) == ["x", "y"] == vocab.read_vocab(tmp_path)
    write_json(tmp_path / "tokenizer.json", {"model": {"vocab": {"z": 0}}})
    assert vocab.read_vocab(weights) == ["z"]  # tokenizer.json first
    assert vocab.read_vocab(tmp_path / "vocab.txt") == ["z"]  # a file stands for its directory
    with pytest.raises(FileNotFoundError, match="no file or directory at"):
        vocab.read_vocab(tmp_path / "absent" / "model.safetensors")


MALFORMED_JSON = [
    (b'{"model": {"vocab": {"a": 0,}}}', r"tokenizer.json: the file is not valid JSON \(Expecting property name .* at line 1, column 29\)"),
    (b"\xff\xfe{}", r"tokenizer.json: the file is not UTF-8 text \(invalid start byte at byte 0\)"),
    (b"[1, 2]", r"has no `model.vocab`; expected a Hugging Face tokenizers file"),
    (b'{"model": {"type": "BPE"}}', r"has no `model.vocab`"),
    (b'{"model": {"vocab": "abc"}}', r"`model.vocab` is a str; expected an object of token ids or a list"),
    (b'{"model": {"vocab": {"a": 0, "b": 0}}}', r"`model.vocab` gives id 0 to both 'a' and 'b'; token ids must be unique"),
    (b'{"model": {"vocab": {"a": 0, "b": -3}}}', r"`model.vocab\['b'\]` is the negative id -3"),
    (b'{"model": {"vocab": {"a": 1.0}}}', r"`model.vocab\['a'\]` is 1.0; a token id must be a non-negative integer"),
    (b'{"model": {"vocab": {"a": true}}}', r"`model.vocab\['a'\]` is True; a token id must be"),
    (b'{"model": {"vocab": {"a": 99999999999}}}', r"is 99999999999, not below 16777216"),
    (b'{"model": {"vocab": [["a", 0.0], 7]}}', r"`model.vocab\[1\]` is 7; a list vocab \(Unigram\) holds \[token, score\] pairs"),
    (b'{"model": {"vocab": {}}, "added_tokens": {"id": 1}}', r"`added_tokens` is a dict, not a list"),
    (b'{"model": {"vocab": {}}, "added_tokens": [{"content": "x"}]}', r"`added_tokens\[0\]` is .*needs an integer `id` and a string `content`"),
    (b'{"model": {"vocab": {}}, "added_tokens": [{"id": -1, "content": "x"}]}', r"`added_tokens\[0\].id` is the negative id -1"),
    (
        b'{"model": {"vocab": {}}, "added_tokens": [{"id": 4, "content": "x"}, {"id": 4, "content": "y"}]}',
        r"`added_tokens` gives id 4 to both 'x' and 'y'",
    ),
]


@pytest.mark.parametrize("content,match", MALFORMED_JSON, ids=range(len(MALFORMED_JSON)))
def test_malformed_tokenizer_json(tmp_path, content, match):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        vocab.read_vocab(tmp_path)
    assert str(info.value).startswith(str(path) + ": ")
    assert "Fix or remove" in str(info.value) or "fix or remove" in str(info.value)


def test_malformed_vocab_txt(tmp_path):
    (tmp_path / "vocab.txt").write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(CheckpointError, match=r"vocab.txt: the file is not UTF-8 text \(invalid continuation byte at byte 6\); fix or remove it"):
        vocab.read_vocab(tmp_path)


# --- Display --------------------------------------------------------------------------------------
def test_byte_level_alphabet_is_the_standard_one():
    assert vocab.BYTE_LEVEL_ALPHABET == {c: b for b, c in gpt2_byte_chars().items()}
    assert len(set(vocab.BYTE_LEVEL_ALPHABET.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in vocab.BYTE_LEVEL_ALPHABET)


@pytest.mark.parametrize(
    "token,shown",
    [
        ("Ġhello", " hello"),
        ("Ċ", "\\n"),
        ("ĉĠĊč", "\\t \\n\\r"),
        ("hello", "hello"),
        (byte_level(" café"), " café"),
        (byte_level(" 日本語"), " 日本語"),
        (byte_level("\x00\x7f"), "\\x00\\x7f"),
        (byte_level("\u00a0"), "\\xa0"),  # no-break space: not printable, so escaped
        (byte_level("a\u2028b"), "a\\u2028b"),  # a line separator would break a CSV row
        (byte_level("\\n"), "\\\\n"),  # a real backslash-n is told apart from a newline
        (byte_level("😀"), "😀"),
    ],
)
def test_byte_level_tokens_are_decoded(token, shown):
    assert vocab.display_token(token, byte_level=True) == shown
    assert vocab.display_token(token) == shown  # the guess agrees on these


def test_a_character_split_across_tokens_is_shown_safely():
    em_dash = byte_level("—")  # U+2014, three bytes E2 80 94
    assert len(em_dash) == 3
    head, tail = em_dash[:2], em_dash[2:]
    assert vocab.display_token(head, byte_level=True) == "\\xe2\\x80"
    assert vocab.display_token(tail, byte_level=True) == "\\x94"
    assert vocab.display_token(byte_level(" a") + head, byte_level=True) == " a\\xe2\\x80"
    assert vocab.display_token(em_dash, byte_level=True) == "—"
    # Latin-1 letters only: the guess leaves them alone; the vocabulary's answer decodes them.
    e_acute = byte_level("é")  # "Ã©"
    assert vocab.display_token(e_acute) == e_acute
    assert vocab.display_token(e_acute, byte_level=True) == "é"
    assert vocab.display_token(e_acute[0], byte_level=True) == "\\xc3"


def test_sentencepiece_and_plain_tokens():
    assert vocab.display_token("▁the") == " the"
    assert vocab.display_token("▁▁x▁") == "  x "
    assert vocab.display_token("<0x0A>") == "<0x0A>"
    assert vocab.display_token("##ing") == "##ing"
    assert vocab.display_token("日本") == "日本"
    assert vocab.display_token("") == ""
    # A WordPiece token of Latin Extended-A letters, decoded by the guess, kept when told.
    assert vocab.display_token("č", byte_level=False) == "č"
    assert vocab.display_token("Ġhello", byte_level=False) == "Ġhello"
    assert vocab.display_token("▁Ġ", byte_level=True) == " Ġ"  # not all byte-level: plain text
    for raw, shown in [
        ("a\nb", "a\\nb"), ("tab\there", "tab\\there"), ("cr\r", "cr\\r"), ("back\\slash", "back\\\\slash"),
        ("\x00", "\\x00"), ("\x85", "\\x85"), ("\u200b", "\\u200b"), ("\ufeff", "\\ufeff"),
        ("\u3000", "\\u3000"), ("\U000e0001", "\\U000e0001"), ("\ud800", "\\ud800"), ("\udc80", "\\udc80"),
    ]:
        assert vocab.display_token(raw) == shown == repr(raw)[1:-1]


def test_display_keeps_one_csv_line_per_token():
    tokens = [byte_level(t) for t in ["\n", "\r\n", " \"quoted\"", "a,b", "\u2028", "\x1e"]] + ["▁x\ny", "\u0085"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for i, token in enumerate(tokens):
        writer.writerow([i, vocab.display_token(token)])
    assert len(buffer.getvalue().splitlines()) == len(tokens)
    rows = list(csv.reader(io.StringIO(buffer.getvalue())))
    assert [r[1] for r in rows] == ["\\n", "\\r\\n", ' "quoted"', "a,b", "\\u2028", "\\x1e", " x\\ny", "\\x85"]


def test_is_byte_level_vocab():
    chars = gpt2_byte_chars()
    gpt2_like = [chars[b] for b in range(256)] + ["Ġthe", "<|endoftext|>"]
    assert vocab.is_byte_level_vocab(gpt2_like)
    assert vocab.is_byte_level_vocab(iter(gpt2_like))
    assert not vocab.is_byte_level_vocab(gpt2_like[1:])
    assert not vocab.is_byte_level_vocab(["[PAD]", "a", "b", "č", "##s"])
    assert not vocab.is_byte_level_vocab([])


def test_display_argument_errors():
    with pytest.raises(TypeError, match=r"`token` must be a str; got bytes"):
        vocab.display_token(b"abc")
    with pytest.raises(TypeError, match=r"`byte_level` must be True, False or None; got 'yes'"):
        vocab.display_token("abc", byte_level="yes")


def test_module_imports_nothing_of_lowrank_op_but_its_errors():
    tree = ast.parse(Path(vocab.__file__).read_text(encoding="utf-8"))
    imported = [(node.module, tuple(a.name for a in node.names)) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [(a.name, ()) for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    ours = [entry for entry in imported if (entry[0] or "").split(".")[0] == "lowrank_op"]
    assert ours == [("lowrank_op.errors", ("CheckpointError",))]
