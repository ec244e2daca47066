"""Download MNIST and Fashion-MNIST from their official sources, checked against the published MD5 sums.

Files land in a cache folder (see :func:`cache_dir`) where :func:`pyrossl.data.load_dataset` finds them.
Each file is streamed to a temporary file beside its destination and renamed only once its MD5 sum
matches, so an interrupted or corrupt download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pyrossl.errors import ConfigError, DataError
from pyrossl.files import atomic_write_bytes

_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class RemoteSource:
    """Where a dataset's files are published, and the published MD5 sum of each file."""

    base_url: str
    md5: Mapping[str, str]


#: Official sources of the datasets :func:`download` can fetch.
SOURCES: dict[str, RemoteSource] = {
    "mnist": RemoteSource(
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": RemoteSource(
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}


def cache_dir() -> Path:
    """Return the folder downloads go to: ``$PYROSSL_CACHE``, else ``$XDG_CACHE_HOME/pyrossl``,
    else ``~/.cache/pyrossl``. The folder need not exist yet."""
    if override := os.environ.get("PYROSSL_CACHE"):
        return Path(override).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "pyrossl"
    return Path.home() / ".cache" / "pyrossl"


def download(
    name: str,
    dest: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Fetch the files of dataset ``name`` into ``dest`` (default ``cache_dir() / name``) and return ``dest``.

    Files already present with the expected MD5 sum are kept as they are. ``base_url`` replaces the
    official location (a mirror); ``checksums`` maps file names to MD5 sums that replace the published
    ones for those files. ``timeout`` (seconds) bounds each network operation; ``progress`` shows a
    tqdm bar per file.

    Raises:
        DataError: unknown ``name``, a network error (naming the URL and the reason), or a file whose
            MD5 sum differs from the expected one (the partial file is deleted).
        ConfigError: ``checksums`` names a file the dataset does not have.
    """
    source = SOURCES.get(name)
    if source is None:
        raise DataError(f"no download source for dataset {name!r}; downloadable datasets: {', '.join(SOURCES)}")
    md5 = dict(source.md5)
    if checksums:
        unknown = sorted(set(checksums) - set(md5))
        if unknown:
            raise ConfigError(
                f"checksums name files {name} does not have: {', '.join(unknown)} (files: {', '.join(md5)})"
            )
        md5.update(checksums)
    folder = Path(dest).expanduser() if dest is not None else cache_dir() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create download folder {folder}: {error.strerror or error}") from None
    base = (base_url or source.base_url).rstrip("/") + "/"
    for filename, expected in md5.items():
        target = folder / filename
        if target.is_file() and file_md5(target) == expected.lower():
            continue
        _fetch(base + filename, target, expected.lower(), timeout=timeout, progress=progress)
    return folder


def file_md5(path: str | os.PathLike[str]) -> str:
    """Return the hexadecimal MD5 digest of the file at ``path``."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path, expected_md5: str, *, timeout: float, progress: bool) -> None:
    """Stream ``url`` into ``target`` through a temporary file (:func:`pyrossl.files.atomic_write_bytes`),
    which is renamed into place only if its MD5 is ``expected_md5``."""

    def stream(out) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                with tqdm(
                    total=response.length,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=target.name,
                    disable=not progress,
                ) as bar:
                    while chunk := response.read(_CHUNK_SIZE):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as error:
            raise DataError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise DataError(f"cannot download {url}: {error.reason}") from None
        except (OSError, http.client.HTTPException) as error:
            raise DataError(f"cannot download {url}: {error or type(error).__name__}") from None
        found = digest.hexdigest()
        if found != expected_md5:  # raised inside the write: the temporary file is removed, nothing kept
            raise DataError(
                f"{target.name} from {url} has MD5 {found}, expected {expected_md5}: "
                "the download is corrupt or the server holds other files; nothing was kept"
            )

    atomic_write_bytes(target, stream)
