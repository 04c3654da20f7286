"""Wheels made up on the spot, for tests and labs that exercise the hash-locked install offline."""

import base64
import hashlib
import zipfile
from collections.abc import Mapping
from pathlib import Path


def build_wheel(folder: Path, name: str, version: str, files: Mapping[str, bytes]) -> Path:
    """A pure-Python wheel of NAME VERSION holding FILES (archive path to content), with the metadata and RECORD
    pip expects, written into FOLDER under its standard file name."""
    stem = f"{name.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    content = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: bastion\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},sha256={_urlsafe_digest(data)},{len(data)}\n" for path, data in content.items())
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in content.items():
            archive.writestr(member, data)
        archive.writestr(f"{info}/RECORD", record + f"{info}/RECORD,,\n")
    return path


def sha256_of(path: Path) -> str:
    """PATH's digest as a lock writes it."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _urlsafe_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
