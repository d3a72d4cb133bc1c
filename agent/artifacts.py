"""Installed model versions: assemble a manifest's files from chunks, verify, GC, preflight.

A version lives in `data_dir/models/<model>/<digest>`. It is built in `<digest>.staging`,
every file's size and sha256 is checked against the manifest, the files and folder are
fsynced, and one rename publishes it, so a version folder that exists is complete.
A `.staging` folder left by a kill is deleted at start.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.chunks import ChunkStore, disk_full, file_sha256, fsync_dir
from agent.errors import ArtifactRejected, DiskFull
from edgefleet.core.errors import ManifestError
from edgefleet.core.manifests import NAME_PATTERN, all_chunks, check_path, file_chunks
from protos.artifact.v1 import artifact_pb2


@dataclass(frozen=True)
class DiskNeed:
    needed: int
    free: int
    reserve: int


def _relative(path: str) -> PurePosixPath:
    try:
        return check_path(path)
    except ManifestError as err:
        raise ArtifactRejected(err.message) from None


class ArtifactStore:
    def __init__(self, data_dir: Path, chunks: ChunkStore) -> None:
        self.models_dir = data_dir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.chunks = chunks

    def version_dir(self, model: str, digest: str) -> Path:
        if not NAME_PATTERN.match(model):
            raise ArtifactRejected(
                f"model name {model!r} is not usable as a folder name (letters, digits, . _ -)"
            )
        return self.models_dir / model / digest

    def clean_staging(self) -> int:
        """Delete staging folders a previous run left behind; returns how many."""
        removed = 0
        for staging in self.models_dir.glob("*/*.staging"):
            shutil.rmtree(staging, ignore_errors=True)
            removed += 1
        return removed

    def installed(self, model: str, digest: str) -> bool:
        return self.version_dir(model, digest).is_dir()

    def discard(self, model: str, digest: str) -> None:
        """Delete an installed version folder that failed verification."""
        shutil.rmtree(self.version_dir(model, digest), ignore_errors=True)

    def _write_files(self, staging: Path, manifest: artifact_pb2.Manifest) -> None:
        staging.mkdir(parents=True)
        for entry in manifest.files:
            target = staging / _relative(entry.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                for chunk in file_chunks(entry):
                    src = self.chunks.path(chunk.sha256)
                    if not src.is_file():
                        raise ArtifactRejected(
                            f"chunk {chunk.sha256[:12]} of {entry.path} is not downloaded"
                        )
                    with src.open("rb") as f:
                        shutil.copyfileobj(f, out)
                out.flush()
                os.fsync(out.fileno())

    def assemble(self, model: str, digest: str, manifest: artifact_pb2.Manifest) -> Path:
        """The version's folder, built from chunks and verified file by file."""
        final = self.version_dir(model, digest)
        if final.is_dir():
            try:
                verify_files(final, manifest)
                return final
            except ArtifactRejected:
                # Rotted or tampered on disk: rebuild it from the verified chunks.
                shutil.rmtree(final)
        staging = final.with_name(f"{digest}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._write_files(staging, manifest)
            verify_files(staging, manifest)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)  # never a half-built folder left
            if not (isinstance(err, OSError) and disk_full(err)):
                raise
            raise DiskFull(
                f"the disk filled up while assembling {manifest.model} v{manifest.version}; "
                f"the half-built folder was deleted and what runs keeps running: free space "
                f"under {self.models_dir}"
            ) from None
        for folder in {(staging / _relative(e.path)).parent for e in manifest.files}:
            fsync_dir(folder)
        os.replace(staging, final)
        fsync_dir(final.parent)
        return final

    def gc(self, keep: dict[str, set[str]], manifests: list[artifact_pb2.Manifest]) -> int:
        """Delete version folders not in `keep` (model -> digests) and chunks no kept
        manifest names. Returns bytes freed."""
        freed = 0
        for model_dir in self.models_dir.iterdir():
            if not model_dir.is_dir():
                continue
            wanted = keep.get(model_dir.name, set())
            for version in model_dir.iterdir():
                if version.name in wanted:
                    continue
                freed += _tree_size(version)
                shutil.rmtree(version, ignore_errors=True)
            if not any(model_dir.iterdir()):
                model_dir.rmdir()
        keep_chunks = {c.sha256 for m in manifests for c in all_chunks(m)}
        freed += self.chunks.clean_orphans(keep_chunks)
        return freed

    def preflight(self, manifest: artifact_pb2.Manifest, reserve: int) -> DiskNeed:
        """Fail before downloading when the disk cannot hold the missing chunks plus the
        assembled files plus the reserve."""
        missing = self.chunks.missing(manifest)
        download = sum(c.size for c in missing) - self.chunks.partial_bytes(missing)
        assembled = sum(f.size for f in manifest.files)
        needed = download + assembled
        free = shutil.disk_usage(self.models_dir).free
        if free - needed < reserve:
            raise DiskFull(
                f"not enough disk for {manifest.model} v{manifest.version}: needs {needed} bytes "
                f"({download} to download + {assembled} to assemble) and must leave {reserve} "
                f"free, but only {free} are free in {self.models_dir}; free space or lower "
                "min_free_disk_bytes"
            )
        return DiskNeed(needed, free, reserve)


def verify_files(folder: Path, manifest: artifact_pb2.Manifest) -> None:
    """Every file the manifest names has its size and sha256; raise naming the first bad one."""
    for entry in manifest.files:
        path = folder / _relative(entry.path)
        if not path.is_file():
            raise ArtifactRejected(
                f"{manifest.model} v{manifest.version}: file {entry.path} is missing"
            )
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactRejected(
                f"{manifest.model} v{manifest.version}: file {entry.path} has {size} bytes, "
                f"the manifest says {entry.size}"
            )
        actual = file_sha256(path)
        if actual != entry.sha256:
            raise ArtifactRejected(
                f"{manifest.model} v{manifest.version}: file {entry.path} has sha256 "
                f"{actual[:12]}, the manifest says {entry.sha256[:12]}"
            )


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
