"""Byte-level BPE tokenizer trained on the corpus (docs/design.md §1, stage "tokenizer").

The tokenizer is a plain Hugging Face ``tokenizers`` file (``tokenizer.json``) so that it can be
exported with a model unchanged. Byte-level pre-tokenisation with no normaliser means every string
is representable and ``decode(encode(text)) == text`` for any unicode text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from nexus_moe.config import DEFAULT_VOCAB_SIZE, check_option
from nexus_moe.corpus import corpus_domains, iter_documents, split_file
from nexus_moe.errors import NexusError
from nexus_moe.io_utils import TOKENIZER_FILE, check_output_file, output_file

EOS_TOKEN = "<|endoftext|>"

# End-of-text tokens of tokenizers we may be handed instead of our own (a seed checkpoint's
# tokenizer), tried in order after ours.
_FOREIGN_EOS_TOKENS = ("</s>", "<|im_end|>", "<eos>", "<|end_of_text|>", "<|eot_id|>")

# Without an explicit cap, each domain contributes at most as much as the smallest one, but never
# less than this (a tiny domain must not starve the tokenizer of data) nor more than the upper
# bound (training time grows with the text).
_MIN_DEFAULT_CAP = 1 << 20
_MAX_DEFAULT_CAP = 16 << 20


def tokenizer_file(path: str | Path) -> Path:
    """``path/tokenizer.json`` if ``path`` is a directory, else ``path`` (need not exist yet).

    A path that does not exist is taken as a directory unless it ends in ``.json``.
    """
    path = Path(path)
    if path.is_dir():
        return path / TOKENIZER_FILE
    return path if path.is_file() or path.suffix == ".json" else path / TOKENIZER_FILE


def _domain_cap(sizes: dict[str, int], max_bytes_per_domain: int | None) -> int:
    if max_bytes_per_domain is not None:
        if max_bytes_per_domain <= 0:
            raise NexusError(f"max_bytes_per_domain must be positive, got {max_bytes_per_domain}")
        return max_bytes_per_domain
    smallest = min(sizes.values())
    return min(max(smallest, _MIN_DEFAULT_CAP), _MAX_DEFAULT_CAP)


def _domain_texts(path: Path, file_size: int, cap: int) -> Iterator[str]:
    """Up to ``cap`` UTF-8 bytes of ``path``'s documents, spread over the whole file.

    Taking every k-th document (k from the file size) rather than the first ``cap`` bytes keeps
    the sample representative when a file is sorted (e.g. stdlib modules in alphabetical order).
    """
    stride = max(1, math.ceil(file_size / cap))
    remaining = cap
    for index, text in enumerate(iter_documents(path)):
        if index % stride:
            continue
        size = len(text.encode("utf-8"))
        if size > remaining:
            # Characters are at least one byte each, so this never exceeds the budget.
            text = text[:remaining]
            size = len(text.encode("utf-8"))
        remaining -= size
        yield text
        if remaining <= 0:
            return


def train_tokenizer(
    corpus_dir: Path,
    out_path: Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    domains: list[str] | None = None,
    max_bytes_per_domain: int | None = None,
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer on the train split of ``domains`` of ``corpus_dir``.

    ``domains`` defaults to every domain in the corpus. Each domain contributes at most
    ``max_bytes_per_domain`` UTF-8 bytes (default: the smallest domain's size, clamped to
    1-16 MiB) so that one large domain does not dominate the vocabulary. The special token
    :data:`EOS_TOKEN` gets id 0. ``out_path`` is the ``tokenizer.json`` to write, or a directory to
    write it into; it is written atomically. Returns the trained tokenizer.
    """
    corpus_dir = Path(corpus_dir)
    # 256 byte symbols plus the special token must fit; the trainer allocates by the size asked.
    check_option("vocab_size", vocab_size)
    target = tokenizer_file(out_path)
    check_output_file(target, [corpus_dir])
    names = corpus_domains(corpus_dir, domains)
    files: dict[str, Path] = {}
    for name in names:
        path = split_file(corpus_dir, name)
        if not path.is_file():
            raise NexusError(f"{path}: domain {name!r} has no train split; rebuild the corpus")
        files[name] = path
    sizes = {name: path.stat().st_size for name, path in files.items()}
    cap = _domain_cap(sizes, max_bytes_per_domain)
    seen = {"texts": 0}

    def texts() -> Iterator[str]:
        for name, path in files.items():
            for text in _domain_texts(path, sizes[name], cap):
                seen["texts"] += 1
                yield text

    tok = Tokenizer(models.BPE())
    # No normaliser and no prefix space: the byte-level mapping is then exactly invertible.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    if seen["texts"] == 0:
        raise NexusError(
            f"{corpus_dir}: the train split of domains {names} holds no text to train a "
            "tokenizer on; rebuild the corpus"
        )
    with output_file(target, [corpus_dir]) as tmp:
        tok.save(str(tmp))
    return tok


def load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    """Load a ``tokenizer.json`` file, or the one inside directory ``path``.

    Raises NexusError naming the file when it is missing or cannot be parsed.
    """
    file = tokenizer_file(path)
    if not file.is_file():
        raise NexusError(f"{file}: tokenizer file not found; train one with the tokenizer stage")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception for every parse failure
        raise NexusError(
            f"{file}: not a valid tokenizer file ({exc}); it is corrupt or truncated, "
            "re-create it with the tokenizer stage"
        ) from exc


def eos_id(tok: tokenizers.Tokenizer) -> int:
    """Id of the end-of-text token (:data:`EOS_TOKEN`, or a known foreign equivalent)."""
    for token in (EOS_TOKEN, *_FOREIGN_EOS_TOKENS):
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    raise NexusError(
        f"tokenizer has no end-of-text token (looked for {EOS_TOKEN!r} and "
        f"{', '.join(_FOREIGN_EOS_TOKENS)}); use a tokenizer trained by nexus-moe"
    )
