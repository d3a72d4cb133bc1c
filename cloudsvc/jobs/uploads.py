"""Files and folders operators upload for jobs (data sets, backbone files), kept by content.

An upload lands in `uploads/<digest prefix>/<name>`: the same bytes always map to the same
reference, so uploading a data set twice stores it once, and a job's lineage can name its
data by digest. Folders arrive as tar archives of their contents and are unpacked with the `data` filter
(no absolute paths, links out of the folder or device files), into a staging folder that
is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cloudsvc.errors import InvalidRequest, TooLarge
from cloudsvc.jobs.spec import UPLOAD_PREFIX
from cloudsvc.store.blobs import remove_leftovers

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
DIGEST_CHARS = 16


class UploadKind(Enum):
    FILE = "file"
    FOLDER_TAR = "folder-tar"


@dataclass(frozen=True)
class Upload:
    reference: str
    sha256: str
    size: int
    existed: bool
    path: Path


def safe_name(name: str) -> str:
    """The upload's base name with anything but letters, digits, '.', '_', '-' replaced."""
    base = _UNSAFE.sub("_", Path(name.replace("\\", "/")).name).lstrip(".")
    if not base:
        raise InvalidRequest(f"upload name {name!r} has no usable characters; name the file")
    return base[:120]


class UploadStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def clean_incoming(self) -> int:
        """Delete what a killed upload left (`.incoming-*` files, `.staging-*` folders);
        bytes freed. Only at start, before any upload runs."""
        if not self.root.is_dir():
            return 0
        return remove_leftovers([*self.root.glob(".incoming-*"), *self.root.glob(".staging-*")])

    def receive(self, name: str, kind: UploadKind, size: int, pieces: Iterable[bytes]) -> Upload:
        """Store what `pieces` carry (exactly `size` bytes) and answer its reference."""
        name = safe_name(name)
        if size > self.max_bytes:
            raise TooLarge(
                f"the upload is {size} bytes; this cloud accepts at most {self.max_bytes} "
                "(max_upload_bytes); give the cloud a path on its own disk instead"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            received = 0
            with os.fdopen(fd, "wb") as out:
                for piece in pieces:
                    received += len(piece)
                    if received > size:
                        raise TooLarge(
                            f"more bytes arrived than the {size} announced; send the exact size"
                        )
                    digest.update(piece)
                    out.write(piece)
            if received < size:
                raise InvalidRequest(
                    f"the upload ended after {received} of {size} announced bytes; upload again"
                )
            sha = digest.hexdigest()
            folder = self.root / sha[:DIGEST_CHARS]
            path = folder / name
            reference = f"{UPLOAD_PREFIX}{sha[:DIGEST_CHARS]}/{name}"
            if path.exists():
                return Upload(reference, sha, size, True, path)
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
            try:
                if kind is UploadKind.FILE:
                    tmp.replace(staging / name)
                else:
                    _unpack(tmp, staging / name)
                try:
                    staging.replace(folder)
                except OSError:  # the bytes are there already (another name, or a racer)
                    (staging / name).replace(path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return Upload(reference, sha, size, False, path)
        finally:
            tmp.unlink(missing_ok=True)


def _unpack(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise InvalidRequest(f"the uploaded folder is not a readable tar archive: {err}") from None
