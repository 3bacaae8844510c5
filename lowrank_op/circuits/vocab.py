"""Token strings by id, from the tokenizer files that ship beside a checkpoint, and a printable form.

Two files are read, looked for in this order by :func:`read_vocab`:

``tokenizer.json`` (Hugging Face tokenizers)
    ``model.vocab`` is ``{token: id}`` for BPE, WordPiece and WordLevel models and a list of
    ``[token, score]`` pairs for Unigram (SentencePiece) models, whose ids are the positions.
    ``added_tokens`` lists ``{"id", "content", ...}`` entries; where one has the id of a
    ``model.vocab`` token, its content is the string returned, as tokenizers' own ``id_to_token``
    looks in the added tokens first.
``vocab.txt`` (BERT)
    One token per line; a token's id is its line number (from 0).

Ids below the largest one that the file gives no token (gaps, e.g. between the model's
vocabulary and added tokens placed further up) get the placeholder ``GAP_TOKEN.format(id=i)``,
``"<unassigned:{i}>"``, so every list index is a token id and every entry a string. The list can
be shorter than a model's embedding when the embedding was padded (GPT-NeoX pads 50277 tokens to
50432 rows): callers index it only below its length.

Tokens are returned as the tokenizer stores them: byte-level BPE (GPT-2, RoBERTa, Llama 3, Qwen)
spells every byte of a token as one printable character (``"Ġthe"`` for ``" the"``), and
SentencePiece marks a space with ``"▁"``. :func:`display_token` turns either into the text it
stands for, escaped so that a table or CSV keeps one line per token.

The token strings only label results, so a malformed file raises
:class:`~lowrank_op.errors.CheckpointError` naming the file, the problem and what to do; nothing is
guessed from a file that does not parse.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lowrank_op.errors import CheckpointError

#: The files :func:`read_vocab` looks for, in order.
VOCAB_FILES = ("tokenizer.json", "vocab.txt")
#: The string standing for an id a tokenizer file does not assign.
GAP_TOKEN = "<unassigned:{id}>"
#: Token ids at or above this are refused as corrupt: 16 777 216, 64 times the largest vocabularies
#: in use (Gemma's 256 000), and a list of this many placeholders still fits in memory.
MAX_VOCAB_SIZE = 1 << 24
#: The character SentencePiece writes for a space.
SENTENCEPIECE_SPACE = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
    """``{char: byte}``: the printable character byte-level BPE writes for each of the 256 bytes.

    Bytes that are printable and not space in Latin-1 (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    stand for themselves; the other 68 (``0x00``..``0x20``, ``0x7F``..``0xA0``, ``0xAD``) are
    given ``U+0100``.. ``U+0143`` in byte order, so a space is ``"Ġ"`` (U+0120) and a newline
    ``"Ċ"`` (U+010A).
    """
    itself = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_of = {b: chr(b) for b in itself}
    shifted = (b for b in range(256) if b not in char_of)
    char_of.update((b, chr(0x100 + n)) for n, b in enumerate(shifted))
    return {char: b for b, char in char_of.items()}


#: ``{char: byte}`` of byte-level BPE (:func:`_byte_level_alphabet`).
BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_SHIFTED_FIRST, _SHIFTED_LAST = "\u0100", "\u0143"
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# --- Reading --------------------------------------------------------------------------------------
def read_vocab(directory_or_file: str | Path) -> list[str] | None:
    """The token strings beside a checkpoint, indexed by token id; None when there are none.

    Parameters
    ----------
    directory_or_file : path
        A checkpoint's directory, or any file in it (the checkpoint itself, say).

    Returns
    -------
    list of str or None
        From ``tokenizer.json`` (:func:`tokens_from_tokenizer_json`) if the directory has one,
        else from ``vocab.txt`` (:func:`tokens_from_vocab_txt`); None when it has neither.

    Raises
    ------
    FileNotFoundError
        When ``directory_or_file`` does not exist.
    CheckpointError
        When the file found is malformed (see the two readers).

    Notes
    -----
    Cost ``O(file size)``: the whole file is parsed.
    """
    path = Path(directory_or_file)
    if not path.exists():
        raise FileNotFoundError(f"no file or directory at {path}; pass a checkpoint or its directory.")
    directory = path if path.is_dir() else path.parent
    readers = {"tokenizer.json": tokens_from_tokenizer_json, "vocab.txt": tokens_from_vocab_txt}
    for name in VOCAB_FILES:
        if (directory / name).is_file():
            return readers[name](directory / name)
    return None


def _read_text(path: Path) -> str:
    """The file's text, UTF-8 (a leading byte-order mark dropped); CheckpointError if it is not."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{path}: the file is not UTF-8 text ({err.reason} at byte {err.start}); fix or remove it."
        ) from None


def _check_id(path: Path, value: object, where: str) -> int:
    if type(value) is not int:
        raise CheckpointError(
            f"{path}: {where} is {value!r}; a token id must be a non-negative integer. Fix or remove the file."
        )
    if value < 0:
        raise CheckpointError(
            f"{path}: {where} is the negative id {value}; token ids start at 0. Fix or remove the file."
        )
    if value >= MAX_VOCAB_SIZE:
        raise CheckpointError(
            f"{path}: {where} is {value}, not below {MAX_VOCAB_SIZE} (lowrank_op's limit, far above any "
            "vocabulary in use); the file is corrupt. Fix or remove it."
        )
    return value


def tokens_from_tokenizer_json(path: str | Path) -> list[str]:
    """The token strings of a Hugging Face ``tokenizer.json``, indexed by id.

    Parameters
    ----------
    path : path
        The ``tokenizer.json`` file.

    Returns
    -------
    list of str, length ``1 + the largest id``
        ``model.vocab``'s tokens (a ``{token: id}`` object, or Unigram's list of ``[token, score]``
        pairs) with ``added_tokens``' contents over them; ids assigned by neither hold
        ``GAP_TOKEN.format(id=i)``. Empty when the file assigns no id.

    Raises
    ------
    CheckpointError
        Naming the file: not UTF-8; not JSON (with line and column); no ``model`` object or no
        ``model.vocab``; a vocab that is neither an object nor a list of ``[token, score]``
        pairs; an id that is not an integer, is negative, or is at least ``MAX_VOCAB_SIZE``;
        two tokens of ``model.vocab``, or two different added tokens, with one id; an
        ``added_tokens`` entry without an integer ``id`` and a string ``content``.

    Notes
    -----
    Cost ``O(file size)`` time and memory (the JSON is parsed whole, merges included).
    """
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path}: the file is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix "
            "or remove it."
        ) from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise CheckpointError(
            f"{path}: the file has no `model.vocab`; expected a Hugging Face tokenizers file (as "
            "`tokenizer.save()` writes it). Fix or remove it."
        )
    vocab = model["vocab"]
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        for token, value in vocab.items():
            token_id = _check_id(path, value, f"`model.vocab[{token!r}]`")
            if token_id in by_id:
                raise CheckpointError(
                    f"{path}: `model.vocab` gives id {token_id} to both {by_id[token_id]!r} and {token!r}; "
                    "token ids must be unique. Fix or remove the file."
                )
            by_id[token_id] = token
    elif isinstance(vocab, list):
        for i, entry in enumerate(vocab):
            if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
                raise CheckpointError(
                    f"{path}: `model.vocab[{i}]` is {entry!r}; a list vocab (Unigram) holds [token, score] "
                    "pairs. Fix or remove the file."
                )
            by_id[i] = entry[0]
    else:
        raise CheckpointError(
            f"{path}: `model.vocab` is a {type(vocab).__name__}; expected an object of token ids or a "
            "list of [token, score] pairs. Fix or remove the file."
        )
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise CheckpointError(
            f"{path}: `added_tokens` is a {type(added).__name__}, not a list. Fix or remove the file."
        )
    added_by_id: dict[int, str] = {}
    for j, entry in enumerate(added):
        if not (isinstance(entry, dict) and "id" in entry and isinstance(entry.get("content"), str)):
            raise CheckpointError(
                f"{path}: `added_tokens[{j}]` is {entry!r}; each added token needs an integer `id` and a "
                "string `content`. Fix or remove the file."
            )
        token_id = _check_id(path, entry["id"], f"`added_tokens[{j}].id`")
        content = entry["content"]
        if added_by_id.get(token_id, content) != content:
            raise CheckpointError(
                f"{path}: `added_tokens` gives id {token_id} to both {added_by_id[token_id]!r} and "
                f"{content!r}; token ids must be unique. Fix or remove the file."
            )
        added_by_id[token_id] = content
    by_id.update(added_by_id)
    size = max(by_id, default=-1) + 1
    return [by_id.get(i, GAP_TOKEN.format(id=i)) for i in range(size)]


def tokens_from_vocab_txt(path: str | Path) -> list[str]:
    """The token strings of a BERT ``vocab.txt``: one per line, the id being the line number.

    Parameters
    ----------
    path : path
        The ``vocab.txt`` file.

    Returns
    -------
    list of str
        One per line, without its line ending. Lines end at ``\\n``, ``\\r\\n`` or ``\\r``, as
        transformers reads the file (in text mode); a final line ending adds no empty token, an
        empty line in between is the token ``""``. A leading byte-order mark is dropped.

    Raises
    ------
    CheckpointError
        When the file is not UTF-8 text.

    Notes
    -----
    Cost ``O(file size)``.
    """
    path = Path(path)
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


# --- Display --------------------------------------------------------------------------------------
def is_byte_level_vocab(tokens: Iterable[str]) -> bool:
    """Whether ``tokens`` is a byte-level BPE vocabulary: it holds all 256 byte characters as tokens.

    Byte-level BPE starts its vocabulary from one token per byte (GPT-2's ids 0-255), so every
    character of :data:`BYTE_LEVEL_ALPHABET` is a token of its own; a WordPiece or SentencePiece
    vocabulary lacks most of ``U+0100``..``U+0143``. Pass the answer to :func:`display_token` as
    ``byte_level``. Cost ``O(len(tokens))``.
    """
    singles = {t for t in tokens if isinstance(t, str) and len(t) == 1}
    return singles.issuperset(BYTE_LEVEL_ALPHABET)


def display_token(token: str, *, byte_level: bool | None = None) -> str:
    """A printable, one-line form of a token string, for a table or CSV cell.

    Parameters
    ----------
    token : str
        A token as its vocabulary stores it.
    byte_level : bool or None
        Whether the vocabulary is byte-level BPE (:func:`is_byte_level_vocab` tells). True: a
        token made only of byte-level characters is decoded from them. False: never decoded. None
        (default): decoded when made only of byte-level characters of which at least one is in
        ``U+0100``..``U+0143`` (``"Ġ"`` for a space, ``"Ċ"`` for a newline); a guess, wrong for
        the few tokens of other vocabularies made only of Latin-1 and Latin Extended-A letters
        (``"č"`` reads as byte 0x0D), so pass the vocabulary's answer where you have it.

    Returns
    -------
    str
        The token's text: decoded byte-level tokens as UTF-8 (``"Ġhello"`` -> ``" hello"``), with
        each byte that is not part of a whole character (a character split across tokens) shown
        as ``\\xNN``; other tokens with SentencePiece's ``"▁"`` read as a space
        (``"▁the"`` -> ``" the"``). Then escaped as Python's ``repr`` escapes a string, without
        the quotes: a backslash doubled, ``\\n``, ``\\r``, ``\\t``, and ``\\xNN``, ``\\uNNNN``
        or ``\\UNNNNNNNN`` for any other character that is not printable (controls, line and
        paragraph separators, spaces other than U+0020, format characters, lone surrogates).
        So the result has no line break, and distinct decodings display distinctly.

    Notes
    -----
    WordPiece's ``"##"`` continuation prefix and SentencePiece's byte tokens (``"<0x0A>"``) are
    left as they are. Cost ``O(len(token))``.

    Examples
    --------
    >>> display_token("Ġhello"), display_token("Ċ"), display_token("▁the")
    (' hello', '\\\\n', ' the')
    >>> display_token("âĢ"), display_token("âĢĶ")  # U+2014 split after two of its three bytes
    ('\\\\xe2\\\\x80', '—')
    """
    if not isinstance(token, str):
        raise TypeError(f"`token` must be a str; got {type(token).__name__}.")
    if byte_level not in (None, True, False):
        raise TypeError(f"`byte_level` must be True, False or None; got {byte_level!r}.")
    decode = byte_level is not False and all(c in BYTE_LEVEL_ALPHABET for c in token)
    if decode and byte_level is None:
        decode = any(_SHIFTED_FIRST <= c <= _SHIFTED_LAST for c in token)
    if decode:
        # Bytes that do not decode become U+DC80..U+DCFF (surrogateescape), escaped below as \xNN.
        text = bytes(BYTE_LEVEL_ALPHABET[c] for c in token).decode("utf-8", errors="surrogateescape")
        return _escape(text, undecoded_bytes=True)
    return _escape(token.replace(SENTENCEPIECE_SPACE, " "), undecoded_bytes=False)


def _escape(text: str, undecoded_bytes: bool) -> str:
    """``text`` with repr-style escapes; U+DC80..U+DCFF as ``\\xNN`` when they stand for bytes."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for c in text:
        code = ord(c)
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif undecoded_bytes and 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)
