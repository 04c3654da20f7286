"""The Python packages are hash-locked: requirements.lock is complete, every entry is pinned and hashed, and the
install refuses a package that does not match its hash (docs/dependencies.md)."""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import signal
import subprocess
import tarfile
import time
import tomllib
import venv
from pathlib import Path

import psutil
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bastion.devstack.python_lock import LOCK_FILE, LockError, install_offline, read_lock
from bastion.settings import PROJECT_ROOT
from bastion.testing.wheels import build_wheel, sha256_of

INSTALL = PROJECT_ROOT / "scripts" / "install_locked_deps.sh"
PROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
DECLARED = [*PROJECT["project"]["dependencies"], *PROJECT["project"]["optional-dependencies"]["dev"]]


def pyproject_pins() -> dict[str, str]:
    pins = {}
    for text in DECLARED:
        requirement = Requirement(text)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"pyproject.toml pins every package to one version: {text}"
        pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_the_build_backend_is_pinned_as_a_dev_dependency_so_the_lock_holds_the_same_version():
    """`make lock` reads the project's dependencies, not [build-system]: the dev pin is what keeps them equal."""
    (backend,) = PROJECT["build-system"]["requires"]
    assert backend in PROJECT["project"]["optional-dependencies"]["dev"]


def test_every_pin_of_pyproject_is_locked_at_the_same_version():
    locked = {entry.name: entry.version for entry in read_lock(LOCK_FILE.read_text())}
    stale = {name: (version, locked.get(name)) for name, version in pyproject_pins().items()
             if locked.get(name) != version}
    assert not stale, f"pyproject.toml and requirements.lock disagree (run `make lock`): {stale}"


def test_every_locked_package_is_pinned_and_carries_sha256_hashes():
    entries = read_lock(LOCK_FILE.read_text())
    assert len(entries) > 50
    assert len({(entry.name, str(entry.marker)) for entry in entries}) == len(entries), "a package locked twice"
    for entry in entries:
        assert entry.hashes, f"{entry.name} has no hash"
        for value in entry.hashes:
            algorithm, _, digest = value.partition(":")
            assert algorithm == "sha256" and len(digest) == 64 and int(digest, 16) >= 0, f"{entry.name}: {value}"


def test_the_lock_names_no_other_source_and_no_local_or_url_package():
    for line in LOCK_FILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("-") and not stripped.startswith("--hash="):
            pytest.fail(f"an option in the lock (another index, a link, an editable?): {stripped}")
        assert "://" not in stripped.split("#", 1)[0], f"a URL in the lock: {stripped}"


def test_the_lock_is_closed_every_package_pyproject_needs_here_is_locked_with_all_it_needs():
    """The install takes nothing the lock does not name (--no-deps): walk pyproject's requirements, extras and all,
    through the installed packages' own, and every one that applies here must be locked."""
    locked = {entry.name for entry in read_lock(LOCK_FILE.read_text()) if entry.applies()}
    wanted = [Requirement(text) for text in DECLARED]
    seen: set[tuple[str, frozenset[str]]] = set()
    missing = set()
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        if name not in locked:
            missing.add(name)
            continue
        for text in importlib.metadata.requires(name) or []:
            needed = Requirement(text)
            environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if needed.marker is None or any(needed.marker.evaluate(env) for env in environments):
                wanted.append(needed)
    assert not missing, f"needed but not in requirements.lock: {sorted(missing)}"
    assert {"psycopg-binary", "grpcio", "uv"} <= {name for name, _extras in seen}


def test_what_is_installed_here_is_what_the_lock_says():
    applying = {entry.name: entry.version for entry in read_lock(LOCK_FILE.read_text()) if entry.applies()}
    installed = {canonicalize_name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}
    installed.pop("bastion", None)  # the project itself, editable
    assert {name: version for name, version in installed.items() if applying.get(name) != version} == {}, \
        "installed here, but not as the lock says (a package left from before? `pip uninstall` it, or `make lock`)"
    assert applying.keys() <= installed.keys()


INSTALLER = re.compile(r"\b(pip3?|uv|npm|npx|easy_install)\b|-m pip|install_locked")


@pytest.mark.parametrize("target", ["test", "demo"])
def test_the_make_targets_install_python_packages_only_through_the_locked_install(target: str):
    """What `make test` (and so .ci/run) and `make demo` run, printed by `make -n`: every Python package comes from
    the hash-locked install script, and the node tools from theirs."""
    commands = subprocess.run(["make", "-n", "-B", target], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=True, timeout=60).stdout.splitlines()
    installs = [line for line in commands if INSTALLER.search(line)]
    python = "scripts/install_locked_deps.sh .venv requirements.lock ."
    assert installs == ([python, "scripts/install_locked_node_tools.sh"] if target == "test" else [python])


def test_reading_the_lock_refuses_an_entry_that_is_not_pinned():
    with pytest.raises(LockError, match="not pinned"):
        read_lock("requests>=2 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(LockError, match="not pinned"):
        read_lock("requests\n")
    (entry,) = read_lock("six==1.17.0 ; python_version >= '3' \\\n    --hash=sha256:" + "a" * 64 + "\n    # via x\n")
    assert (entry.name, entry.version, entry.hashes) == ("six", "1.17.0", ("sha256:" + "a" * 64,))
    assert entry.text == "six==1.17.0 ; python_version >= '3' --hash=sha256:" + "a" * 64
    with pytest.raises(LockError, match="not pinned"):
        read_lock("six==1.* --hash=sha256:" + "a" * 64 + "\n")
    # A comment line is never continued (pip's rule), so the hash line after it is a line of its own, no package.
    with pytest.raises(LockError, match="not a requirement"):
        read_lock("six==1.17.0\n# a comment ending in a backslash \\\n--hash=sha256:" + "a" * 64 + "\n")
    (entry,) = read_lock("six==1.17.0 --hash=sha256:" + "a" * 64 + "  # via #1\n")
    assert entry.hashes == ("sha256:" + "a" * 64,)


def test_a_continued_last_line_of_the_lock_is_an_entry_too():
    (entry,) = read_lock("six==1.17.0 \\\n    --hash=sha256:" + "a" * 64 + " \\")
    assert (entry.name, entry.hashes) == ("six", ("sha256:" + "a" * 64,))


def test_the_offline_install_gives_pip_no_index_but_the_folder(tmp_path):
    script = tmp_path / "install.sh"
    script.write_text(f'env > {tmp_path}/env\necho "$@" > {tmp_path}/args\n')
    result = install_offline(tmp_path / "venv", tmp_path / "test.lock", tmp_path / "index", script=script)
    assert result.returncode == 0, result.stderr
    environment = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert environment["PIP_NO_INDEX"] == "1" and environment["PIP_FIND_LINKS"] == str(tmp_path / "index")
    assert (tmp_path / "args").read_text().split() == [str(tmp_path / "venv"), str(tmp_path / "test.lock"), "-"]


def test_an_offline_install_that_runs_too_long_is_killed_with_the_pip_it_started(tmp_path):
    script, child = tmp_path / "install.sh", tmp_path / "child"
    script.write_text(f"sleep 60 &\necho $! > {child}\nwait\n")
    with pytest.raises(subprocess.TimeoutExpired):
        install_offline(tmp_path / "venv", tmp_path / "test.lock", tmp_path / "index", script=script, timeout=1)
    pid = int(child.read_text())
    still_running = True
    deadline = time.monotonic() + 5  # SIGKILL is delivered at once, but a busy machine may take a moment to end it
    while still_running and time.monotonic() < deadline:
        try:
            still_running = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            still_running = False
        if still_running:
            time.sleep(0.05)
    if still_running:
        os.kill(pid, signal.SIGKILL)
    assert not still_running, "the install's child outlived the timeout"


# The install itself, offline: a made-up package served from a folder in place of the index.

PACKAGE = "bastion-lock-probe"
MODULE = "bastion_lock_probe"


def wheel(folder: Path, payload: str, name: str = PACKAGE) -> Path:
    return build_wheel(folder, name, "1.0", {f"{name.replace('-', '_')}/__init__.py": payload.encode()})


@pytest.fixture(scope="module")
def scratch_venv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(folder)
    return folder


@pytest.fixture
def index(tmp_path) -> Path:
    folder = tmp_path / "index"
    folder.mkdir()
    return folder


def install(scratch_venv: Path, index: Path, lock_text: str) -> subprocess.CompletedProcess[str]:
    lock = index.parent / "test.lock"
    lock.write_text(lock_text)
    subprocess.run([scratch_venv / "bin" / "pip", "uninstall", "--quiet", "--yes", PACKAGE, "bastion-lock-other"],
                   check=True, capture_output=True)
    return install_offline(scratch_venv, lock, index)


def installed(scratch_venv: Path, name: str) -> bool:
    result = subprocess.run([scratch_venv / "bin" / "python", "-c", f"import {name}"], capture_output=True)
    return result.returncode == 0


def test_the_install_takes_a_package_that_matches_its_hash(scratch_venv, index):
    genuine = wheel(index, "GENUINE = True\n")
    result = install(scratch_venv, index, f"{PACKAGE}==1.0 --hash={sha256_of(genuine)}\n")
    assert result.returncode == 0, result.stderr
    assert installed(scratch_venv, MODULE)


def test_the_install_refuses_a_package_altered_after_it_was_locked_and_installs_nothing(scratch_venv, index):
    other = wheel(index, "", name="bastion-lock-other")
    locked_hash = sha256_of(wheel(index, "GENUINE = True\n"))
    wheel(index, "import os  # the attacker's code\n")  # the index now serves another file under the same name
    result = install(scratch_venv, index, f"bastion-lock-other==1.0 --hash={sha256_of(other)}\n"
                                          f"{PACKAGE}==1.0 --hash={locked_hash}\n")
    assert result.returncode != 0
    assert "DO NOT MATCH THE HASHES" in result.stderr and PACKAGE.replace("-", "_") in result.stderr
    assert not installed(scratch_venv, MODULE)
    assert not installed(scratch_venv, "bastion_lock_other"), "a package of the lock was installed all the same"


def test_the_install_refuses_a_lock_entry_without_a_hash(scratch_venv, index):
    wheel(index, "GENUINE = True\n")
    result = install(scratch_venv, index, f"{PACKAGE}==1.0\n")
    assert result.returncode != 0
    assert "hash" in result.stderr.lower()
    assert not installed(scratch_venv, MODULE)


def test_the_project_is_built_with_the_virtualenvs_own_packages_never_a_build_requirement_fetched_unchecked(
    scratch_venv, index,
):
    """The project's editable install: a build requirement that only the index has (no hash checks there) is
    never fetched into a build environment; the backend sees only what the locked install put in the venv."""
    wheel(index, "", name="bastion-lock-other")
    project, fetched = index.parent / "project", index.parent / "build-requirement-fetched"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["bastion-lock-other==1.0"]\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        '[project]\nname = "bastion-lock-project"\nversion = "1.0"\n')
    (project / "backend.py").write_text(
        "import importlib.util\n"
        f"if importlib.util.find_spec('bastion_lock_other'):\n    open({str(fetched)!r}, 'w').close()\n"
        "raise SystemExit('this test backend builds nothing')\n")
    lock = index.parent / "empty.lock"
    lock.write_text("")
    environment = {**os.environ, "PIP_FIND_LINKS": str(index), "PIP_NO_CACHE_DIR": "1"}
    subprocess.run([scratch_venv / "bin" / "pip", "uninstall", "--quiet", "--yes", "bastion-lock-other"],
                   check=True, capture_output=True)
    subprocess.run(["bash", INSTALL, scratch_venv, lock, project], env=environment, capture_output=True,
                   text=True, timeout=120)
    assert not fetched.exists(), "the build requirement was fetched, unchecked, into a build environment"


def test_the_install_refuses_a_source_distribution_even_when_its_hash_matches(scratch_venv, index):
    """A source distribution would run its own build code here; its backend needs nothing from an index."""
    ran = index.parent / "build-code-ran"
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": f"open({str(ran)!r}, 'w').close()\nraise SystemExit('build code ran')\n",
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 1.0\n",
    }
    source = index / f"{MODULE}-1.0.tar.gz"
    with tarfile.open(source, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(f"{MODULE}-1.0/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    result = install(scratch_venv, index, f"{PACKAGE}==1.0 --hash={sha256_of(source)}\n")
    assert result.returncode != 0
    assert not ran.exists(), "the package's build code ran during the install"
    assert not installed(scratch_venv, MODULE)


# The node tools (buf): npm's lock, and no package's install script.

NODE_INSTALL = PROJECT_ROOT / "scripts" / "install_locked_node_tools.sh"


def test_the_node_tools_install_runs_no_package_install_script(tmp_path):
    """A package with a postinstall script, as a hijacked npm package would ship: installed, its script never run."""
    package, project, ran = tmp_path / "package", tmp_path / "project", tmp_path / "install-script-ran"
    package.mkdir()
    project.mkdir()
    (package / "index.js").write_text("module.exports = 1;\n")
    (package / "package.json").write_text(
        '{"name": "lab-dep", "version": "1.0.0", "scripts": {"postinstall": '
        '"node -e \\"require(\'fs\').writeFileSync(process.env.BASTION_TEST_MARKER, \'ran\')\\""}}')
    subprocess.run(["npm", "pack", "--silent", "--pack-destination", project], cwd=package, check=True,
                   capture_output=True, timeout=120)
    (project / "package.json").write_text(
        '{"name": "p", "private": true, "devDependencies": {"lab-dep": "file:lab-dep-1.0.0.tgz"}}')
    offline = {**os.environ, "npm_config_offline": "true", "BASTION_TEST_MARKER": str(ran)}
    subprocess.run(["npm", "install", "--package-lock-only", "--ignore-scripts", "--silent"], cwd=project,
                   env=offline, check=True, capture_output=True, timeout=120)
    assert '"hasInstallScript": true' in (project / "package-lock.json").read_text()

    result = subprocess.run(["bash", NODE_INSTALL, project], env=offline, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert (project / "node_modules" / "lab-dep" / "index.js").exists()
    assert not ran.exists(), "a package's install script ran"
