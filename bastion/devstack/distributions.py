"""Pinned Kafka and Keycloak from Maven Central: fetched once into a shared cache and checked by SHA-256."""

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bastion.devstack.errors import PrerequisiteError

POM_TEMPLATE = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.bastion</groupId><artifactId>{name}-dist</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""
DEPENDENCY = "    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version>{t}</dependency>"


@dataclass(frozen=True)
class Distribution:
    """One pinned server: its Maven coordinates and the SHA-256 of every file it consists of."""

    name: str
    version: str
    maven: list[str]
    sha256: dict[str, str]
    transitive: bool = True


def load_distributions(path: Path) -> dict[str, Distribution]:
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    return {
        name: Distribution(
            name, str(entry["version"]), list(entry["maven"]), dict(entry.get("sha256") or {}),
            bool(entry.get("transitive", True)),
        )
        for name, entry in raw.items()
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pom(dist: Distribution) -> str:
    deps = []
    for coordinate in dist.maven:
        parts = coordinate.split(":")
        group, artifact, version = parts[0], parts[1], parts[2]
        packaging = f"<type>{parts[3]}</type>" if len(parts) > 3 else ""
        deps.append(DEPENDENCY.format(g=group, a=artifact, v=version, t=packaging))
    return POM_TEMPLATE.format(name=dist.name, dependencies="\n".join(deps))


def verify(dist: Distribution, folder: Path) -> None:
    """Every file in FOLDER is pinned and matches its pin, and every pinned file is there."""
    present = {p.name for p in folder.iterdir() if p.is_file()}
    unexpected = present - dist.sha256.keys()
    missing = dist.sha256.keys() - present
    if unexpected or missing:
        raise PrerequisiteError(
            f"{dist.name} {dist.version}: the fetched files differ from infra/distributions.yaml "
            f"(unexpected: {sorted(unexpected) or 'none'}; missing: {sorted(missing) or 'none'})",
            "if you changed a version on purpose run `bastion setup --relock` and review the diff; "
            "otherwise delete the cache folder and run `make setup` again",
        )
    for name, expected in dist.sha256.items():
        actual = sha256_of(folder / name)
        if actual != expected:
            raise PrerequisiteError(
                f"{dist.name}: {name} has SHA-256 {actual}, but {expected} is pinned",
                "the download is corrupt or was tampered with: delete the cache folder and run `make setup`",
            )


def fetch(dist: Distribution, cache_dir: Path, relock: bool = False) -> Path:
    """The cache folder holding DIST's verified files, downloading them with Maven when absent."""
    target = cache_dir / f"{dist.name}-{dist.version}"
    if target.exists() and not relock:
        verify(dist, target)
        return target
    if shutil.which("mvn") is None:
        raise PrerequisiteError(
            "Maven (`mvn`) is not installed; it fetches Kafka and Keycloak from Maven Central",
            "install Maven 3.8 or newer (Debian: `apt-get install maven`) and run `make setup` again",
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{dist.name}-") as work:
        work_dir = Path(work)
        out = work_dir / "files"
        if dist.transitive:
            (work_dir / "pom.xml").write_text(_pom(dist))
            goals = [["dependency:copy-dependencies", f"-DoutputDirectory={out}", "-DincludeScope=runtime"]]
        else:
            # `copy` fetches just the named artifact; resolving a dependency tree would download the
            # hundreds of jars a bundled distribution such as Keycloak's zip already contains.
            goals = [["dependency:copy", f"-Dartifact={c}", f"-DoutputDirectory={out}"] for c in dist.maven]
        for goal in goals:
            result = subprocess.run(["mvn", "-B", "-q", "-C", *goal], cwd=work_dir, capture_output=True, text=True,
                                    check=False)
            if result.returncode != 0:
                break
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            raise PrerequisiteError(
                f"Maven could not fetch {dist.name} {dist.version} from Maven Central:\n{tail}",
                "check the network connection to repo.maven.apache.org (or your Maven mirror) and retry",
            )
        if relock:
            pins = {p.name: sha256_of(p) for p in out.iterdir()}
            dist = Distribution(dist.name, dist.version, dist.maven, pins, dist.transitive)
        verify(dist, out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target


def relocked(path: Path, fetched: dict[str, Path]) -> str:
    """The distributions file with the SHA-256 pins replaced by those of the freshly FETCHED folders."""
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    for name, folder in fetched.items():
        raw[name]["sha256"] = {p.name: sha256_of(p) for p in sorted(folder.iterdir())}
    header = "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("#"))
    return header + yaml.safe_dump(raw, sort_keys=False)
