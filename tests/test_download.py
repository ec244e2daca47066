"""Downloads from a local HTTP server: MD5-checked, atomic, skipped when present, clear errors."""

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrossl.data import cache_dir, download, load_dataset, write_idx
from pyrossl.data.download import SOURCES
from pyrossl.errors import ConfigError, DataError

FILES = list(SOURCES["mnist"].md5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """Serve tiny MNIST-like .gz fixtures on 127.0.0.1; yield (base URL, {file: md5}, request log)."""
    folder = tmp_path / "served"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 4, 4), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (3, 4, 4), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([7, 8, 9], dtype=np.uint8))
    checksums = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in FILES}
    requests: list[str] = []

    class LoggingHandler(QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(LoggingHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", checksums, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name not in FILES)


def test_download_then_load(served, tmp_path):
    base_url, checksums, requests = served
    dest = tmp_path / "dest"
    assert download("mnist", dest=dest, base_url=base_url, checksums=checksums, progress=True) == dest
    assert sorted(path.name for path in dest.iterdir()) == sorted(FILES)
    assert sorted(requests) == sorted(f"/{name}" for name in FILES)

    ds = load_dataset("mnist", data_dir=dest)
    assert ds.x.shape == (9, 1, 4, 4) and ds.x.dtype == torch.float32
    assert ds.y.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert ds.test_index.tolist() == [6, 7, 8]


def test_present_files_are_skipped_and_bad_ones_fetched_again(served, tmp_path):
    base_url, checksums, requests = served
    dest = download("mnist", dest=tmp_path / "dest", base_url=base_url, checksums=checksums, progress=False)
    requests.clear()
    download("mnist", dest=dest, base_url=base_url, checksums=checksums, progress=False)
    assert requests == []

    (dest / FILES[0]).write_bytes(b"stale")
    download("mnist", dest=dest, base_url=base_url, checksums=checksums, progress=False)
    assert requests == [f"/{FILES[0]}"]
    assert hashlib.md5((dest / FILES[0]).read_bytes()).hexdigest() == checksums[FILES[0]]


def test_wrong_md5_raises_and_keeps_nothing(served, tmp_path):
    base_url, checksums, _ = served
    wrong = {**checksums, FILES[1]: "0" * 32}
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as caught:
        download("mnist", dest=dest, base_url=base_url, checksums=wrong, progress=False)
    message = str(caught.value)
    assert FILES[1] in message and "0" * 32 in message and checksums[FILES[1]] in message
    assert not (dest / FILES[1]).exists()
    assert leftovers(dest) == []


def test_http_404_names_the_url(served, tmp_path):
    base_url, checksums, _ = served
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/missing/train-images.*404"):
        download("mnist", dest=tmp_path / "dest", base_url=base_url + "missing", checksums=checksums, progress=False)
    assert leftovers(tmp_path / "dest") == []


def test_connection_refused_is_a_data_error(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match=rf"cannot download http://127\.0\.0\.1:{port}/"):
        download("mnist", dest=tmp_path / "dest", base_url=f"http://127.0.0.1:{port}", timeout=5, progress=False)


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(DataError, match="mnist, fashion-mnist"):
        download("cifar10", dest=tmp_path)


def test_checksums_for_unknown_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="other.gz"):
        download("mnist", dest=tmp_path, checksums={"other.gz": "0" * 32})


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PYROSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("PYROSSL_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "pyrossl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pyrossl"


def test_default_destination_is_the_cache(served, tmp_path, monkeypatch):
    base_url, checksums, _ = served
    monkeypatch.setenv("PYROSSL_CACHE", str(tmp_path / "cache"))
    assert download("mnist", base_url=base_url, checksums=checksums, progress=False) == tmp_path / "cache" / "mnist"
    assert len(load_dataset("mnist", data_dir=tmp_path / "cache" / "mnist")) == 9
