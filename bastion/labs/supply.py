"""Supply-chain lab: a tampered jar in the download cache Kafka runs from (one byte changed, as a backdoor would
change more), and an extra jar slipped in beside the others. `bastion setup` and every `bastion up` check every
file of a pinned distribution against its SHA-256 in infra/distributions.yaml before anything starts from it.

The lab works on a scratch copy of the cache (hard links, next to the real folder) and runs the very function set-up
runs (`distributions.fetch`); the install's own cache is never touched."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bastion.devstack import distributions
from bastion.devstack.errors import PrerequisiteError
from bastion.labs.base import Evidence
from bastion.labs.platform import LabSetupError, Session

TAMPERED = "kafka-clients-{version}.jar"
SLIPPED_IN = "kafka-metrics-reporter-1.0.jar"


def tampered_download(session: Session) -> Iterator[Evidence]:
    dist = session.ctx.distributions["kafka"]
    cached = session.ctx.distribution_dir("kafka")
    if not cached.is_dir():
        raise LabSetupError(f"no Kafka download in {cached}: run `bastion setup` first")
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".lab-tampered-download-") as scratch:
        cache = Path(scratch)
        copy = _linked_copy(cached, cache / cached.name)
        yield _outcome("the scratch copy as downloaded (calibration)", dist, cache, expect_refusal=False)

        victim = copy / TAMPERED.format(version=dist.version)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.unlink()  # a hard link: write a new file, never through the link into the real cache
        victim.write_bytes(bytes(data))
        yield Evidence("the tampering", f"one byte of {victim.name} flipped ({len(data):,} bytes)")
        yield _outcome("set-up's check of the tampered copy", dist, cache, expect_refusal=True)

        shutil.copyfile(cached / victim.name, victim)
        (copy / SLIPPED_IN).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: a jar that adds itself
        yield Evidence("the slipped-in jar", f"{SLIPPED_IN} added to the folder Kafka's classpath is built from")
        yield _outcome("set-up's check of the copy with an extra jar", dist, cache, expect_refusal=True)


def _linked_copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            os.link(path, target / path.name)
    return target


def _outcome(what: str, dist: distributions.Distribution, cache: Path, expect_refusal: bool) -> Evidence:
    try:
        distributions.fetch(dist, cache)
    except PrerequisiteError as refusal:
        if not expect_refusal:
            raise LabSetupError(f"the untouched copy was refused: {refusal.problem}") from None
        return Evidence(what, f"refused: {refusal.problem}", True)
    if expect_refusal:
        return Evidence(what, "accepted: Kafka would start from it", False)
    return Evidence(what, "verified: every file matches its pin")
