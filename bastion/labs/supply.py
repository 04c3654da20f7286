"""Supply-chain labs.

`tampered-download`: a tampered jar in the download cache Kafka runs from (one byte changed, as a backdoor would
change more), and an extra jar slipped in beside the others. `bastion setup` and every `bastion up` check every
file of a pinned distribution against its SHA-256 in infra/distributions.yaml before anything starts from it.
The lab works on a scratch copy of the cache (hard links, next to the real folder) and runs the very function
set-up runs (`distributions.fetch`); the install's own cache is never touched.

`tampered-package`: the package index serves a Python package the services import, at the version
requirements.lock pins, with the attacker's code added. The lab installs it the way `make setup` installs every
package (scripts/install_locked_deps.sh, the project's own lock entry for it) into a scratch virtualenv, from a
folder standing in for the index; the install's own virtualenv is never touched."""

import os
import shutil
import subprocess
import tempfile
import venv
from collections.abc import Iterator
from pathlib import Path

from bastion.devstack import distributions, python_lock
from bastion.devstack.errors import PrerequisiteError
from bastion.labs.base import Evidence
from bastion.labs.platform import LabSetupError, Session
from bastion.testing.wheels import build_wheel, sha256_of

TAMPERED = "kafka-clients-{version}.jar"
SLIPPED_IN = "kafka-metrics-reporter-1.0.jar"

VICTIM = "tenacity"  # every service's retries: imported by the client of every call between services
GENUINE = "bastion-lab-genuine"
HASH_REFUSAL = "DO NOT MATCH THE HASHES"


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
        yield _outcome("set-up's check of the tampered copy", dist, cache, expect_refusal=True,
                       names=(victim.name, "is pinned"))

        shutil.copyfile(cached / victim.name, victim)
        (copy / SLIPPED_IN).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: a jar that adds itself
        yield Evidence("the slipped-in jar", f"{SLIPPED_IN} added to the folder Kafka's classpath is built from")
        yield _outcome("set-up's check of the copy with an extra jar", dist, cache, expect_refusal=True,
                       names=(SLIPPED_IN, "unexpected"))


def _linked_copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            os.link(path, target / path.name)
    return target


def _outcome(what: str, dist: distributions.Distribution, cache: Path, expect_refusal: bool,
             names: tuple[str, ...] = ()) -> Evidence:
    """The check of the copy in CACHE. A refusal holds only when it NAMES what was tampered with (the file and the
    pin check): a refusal for another cause (Maven failing to fetch, say) says nothing of the pins."""
    try:
        distributions.fetch(dist, cache)
    except PrerequisiteError as refusal:
        if not expect_refusal:
            raise LabSetupError(f"the untouched copy was refused: {refusal.problem}") from None
        if not all(name in refusal.problem for name in names):
            return Evidence(what, f"refused: {refusal.problem} (expected a refusal naming {', '.join(names)}: "
                                  "another check refused it)", False)
        return Evidence(what, f"refused: {refusal.problem}", True)
    if expect_refusal:
        return Evidence(what, "accepted: Kafka would start from it", False)
    return Evidence(what, "verified: every file matches its pin")


def tampered_package(session: Session) -> Iterator[Evidence]:
    victim = _locked(VICTIM)
    with tempfile.TemporaryDirectory(prefix="bastion-lab-tampered-package-") as scratch:
        folder = Path(scratch)
        index, target = folder / "index", folder / "venv"
        index.mkdir()
        try:
            venv.EnvBuilder(with_pip=True).create(target)
        except (OSError, subprocess.CalledProcessError) as error:
            raise LabSetupError(f"cannot make a scratch virtualenv: {error}") from None

        genuine = build_wheel(index, GENUINE, "1.0", {"bastion_lab_genuine/__init__.py": b"GENUINE = True\n"})
        lock = folder / "genuine.lock"
        lock.write_text(f"{GENUINE}==1.0 --hash={sha256_of(genuine)}\n")
        result = _install(target, lock, index)
        if result.returncode != 0 or not _imports(target, "bastion_lab_genuine"):
            raise LabSetupError(f"the install refused a wheel that matches its locked hash: {_pip_says(result)}")
        yield Evidence("a made-up wheel installed with its own hash (calibration)", "installed")

        ran = folder / "attacker-code-ran"
        payload = f"open({str(ran)!r}, 'w').close()  # the attacker's code, run on import\n".encode()
        backdoored = build_wheel(index, victim.name, victim.version, {f"{victim.name}/__init__.py": payload})
        yield Evidence("the tampering", f"the index serves {backdoored.name} ({victim.name} {victim.version}, the "
                                        f"version requirements.lock pins) with code that runs on import")
        lock = folder / "project.lock"
        lock.write_text(victim.text + "\n")
        result = _install(target, lock, index)
        what = f"the install with requirements.lock's entry for {victim.name}"
        if result.returncode == 0:
            if not _imports(target, victim.name):
                raise LabSetupError(f"the install took the lock entry for {victim.name} but installed nothing")
            ran_on_import = "; importing it ran the attacker's code" if ran.exists() else ""
            yield Evidence(what, f"accepted: the backdoored {victim.name} installed{ran_on_import}", False)
        elif HASH_REFUSAL in result.stderr:
            installed = _imports(target, victim.name) or ran.exists()
            yield Evidence(what, f"refused: {_pip_says(result)}", not installed)
        else:
            raise LabSetupError(f"the install failed for another reason than the hashes: {_pip_says(result)}")


def _locked(name: str) -> python_lock.LockEntry:
    try:
        entries = {entry.name: entry for entry in python_lock.read_lock(python_lock.LOCK_FILE.read_text())
                   if entry.applies()}
    except (OSError, python_lock.LockError) as error:
        raise LabSetupError(f"cannot read {python_lock.LOCK_FILE}: {error}") from None
    if name not in entries or not entries[name].hashes:
        raise LabSetupError(f"{python_lock.LOCK_FILE.name} has no hashed entry for {name}")
    return entries[name]


def _install(target: Path, lock: Path, index: Path) -> subprocess.CompletedProcess[str]:
    try:
        return python_lock.install_offline(target, lock, index, script=python_lock.INSTALL_SCRIPT)
    except subprocess.TimeoutExpired:
        raise LabSetupError("the install did not finish within two minutes") from None


def _imports(target: Path, module: str) -> bool:
    """Whether the scratch virtualenv imports MODULE, isolated from this process's paths and folder (-I)."""
    probe = subprocess.run([str(target / "bin" / "python"), "-I", "-c", f"import {module}"], capture_output=True,
                           timeout=60, check=False, cwd=target)
    return probe.returncode == 0


def _pip_says(result: subprocess.CompletedProcess[str]) -> str:
    """pip's answer in one line: for a hash refusal, its headline, the package, and the digests it names."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    if not any(HASH_REFUSAL in line for line in lines):
        return " | ".join(lines[-2:])[:300] or f"pip exited with {result.returncode}"
    package = next((line.split()[0] for line in lines if "==" in line and " from " in line), "?")
    expected = [line.split()[-1] for line in lines if line.startswith("Expected")]
    got = next((line.split()[-1] for line in lines if line.startswith("Got")), "?")
    locked = " or ".join(digest[:12] + "…" for digest in expected)
    return f"pip: THESE PACKAGES {HASH_REFUSAL}: {package}, locked sha256 {locked}, served {got[:12]}…"
