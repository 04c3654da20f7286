"""Pinned Kafka and Keycloak: a cached copy is used only when its files are exactly the pinned ones, byte for byte;
a download goes through Maven with Central's checksums enforced, is checked against the pins before it replaces
the cache, and a failing Maven stops the set-up with its own words. A stand-in `mvn` (a shell script on PATH
that writes the files a real one would) plays Maven Central: no network."""

import hashlib
import os
from pathlib import Path

import pytest

from bastion.devstack.distributions import Distribution, _pom, fetch, load_distributions, relocked, sha256_of, verify
from bastion.devstack.errors import PrerequisiteError

FILES = {"kafka-clients-4.1.1.jar": b"clients", "slf4j-api-2.0.17.jar": b"slf4j"}

FAKE_MVN = """#!/bin/sh
# mvn -B -q -C GOAL -DoutputDirectory=OUT ...: notes its arguments, then writes what the goal would fetch.
echo "$@" >> "$MVN_LOG"
out=""; artifact=""
for arg in "$@"; do
  case "$arg" in
    -DoutputDirectory=*) out="${arg#-DoutputDirectory=}" ;;
    -Dartifact=*) artifact="${arg#-Dartifact=}" ;;
  esac
done
case "$artifact" in *does-not-exist*) echo "[ERROR] Could not resolve $artifact"; exit 1 ;; esac
mkdir -p "$out"
if [ -n "$artifact" ]; then
  printf 'zip of %s' "$artifact" > "$out/$(echo "$artifact" | cut -d: -f2)-$(echo "$artifact" | cut -d: -f3).zip"
else
  printf 'clients' > "$out/kafka-clients-4.1.1.jar"; printf 'slf4j' > "$out/slf4j-api-2.0.17.jar"
fi
"""


def pins(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}


def kafka(sha256: dict[str, str] | None = None, transitive: bool = True,
          maven: list[str] | None = None) -> Distribution:
    return Distribution("kafka", "4.1.1", maven or ["org.apache.kafka:kafka_2.13:4.1.1"],
                        pins(FILES) if sha256 is None else sha256, transitive)


@pytest.fixture()
def mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in Maven on PATH; returns the file its invocations are noted in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mvn").write_text(FAKE_MVN)
    (bin_dir / "mvn").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MVN_LOG", str(tmp_path / "mvn.log"))
    return tmp_path / "mvn.log"


def folder_of(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "kafka-4.1.1"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def test_a_folder_of_exactly_the_pinned_files_verifies(tmp_path: Path) -> None:
    verify(kafka(), folder_of(tmp_path, FILES))


@pytest.mark.parametrize(("files", "reason"), [
    ({**FILES, "evil-1.0.jar": b"x"}, "(unexpected: ['evil-1.0.jar']; missing: none)"),
    ({**FILES, "run.sh": b"x"}, "(unexpected: ['run.sh']; missing: none)"),
    ({"kafka-clients-4.1.1.jar": b"clients"}, "(unexpected: none; missing: ['slf4j-api-2.0.17.jar'])"),
    ({"kafka-clients-4.1.1.jar": b"clients", "slf4j-api-2.0.18.jar": b"slf4j"},
     "(unexpected: ['slf4j-api-2.0.18.jar']; missing: ['slf4j-api-2.0.17.jar'])"),
    ({**FILES, "slf4j-api-2.0.17.jar": b"slf4J"}, "slf4j-api-2.0.17.jar has SHA-256"),
    ({**FILES, "kafka-clients-4.1.1.jar": b"clients\0"}, "kafka-clients-4.1.1.jar has SHA-256"),
], ids=["extra-jar", "extra-script", "missing", "swapped", "changed-byte", "appended-byte"])
def test_a_folder_that_differs_from_the_pins_is_refused(tmp_path: Path, files: dict[str, bytes], reason: str) -> None:
    with pytest.raises(PrerequisiteError) as refused:
        verify(kafka(), folder_of(tmp_path, files))
    assert reason in str(refused.value)


def test_the_digest_covers_every_byte_of_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big.jar"
    content = os.urandom(3 * (1 << 20) + 7)
    path.write_bytes(content)
    assert sha256_of(path) == hashlib.sha256(content).hexdigest()
    path.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    assert sha256_of(path) != hashlib.sha256(content).hexdigest()


def test_a_cached_copy_is_checked_before_it_is_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    folder_of(cache, {**FILES, "kafka-clients-4.1.1.jar": b"tampered"})
    with pytest.raises(PrerequisiteError, match=r"kafka-clients-4\.1\.1\.jar has SHA-256"):
        fetch(kafka(), cache)


def test_a_good_cached_copy_is_used_without_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    folder = folder_of(cache, FILES)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert fetch(kafka(), cache) == folder


def test_without_maven_the_set_up_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(PrerequisiteError, match=r"Maven \(`mvn`\) is not installed"):
        fetch(kafka(), tmp_path / "cache")


def test_a_download_is_fetched_with_checksums_enforced_checked_and_cached(tmp_path: Path, mvn: Path) -> None:
    cache = tmp_path / "cache"
    target = fetch(kafka(), cache)
    assert target == cache / "kafka-4.1.1"
    assert {path.name: path.read_bytes() for path in target.iterdir()} == FILES
    [call] = mvn.read_text().splitlines()
    assert call.startswith("-B -q -C dependency:copy-dependencies ") and "-DincludeScope=runtime" in call
    assert [path.name for path in cache.iterdir()] == ["kafka-4.1.1"], "no work folder left behind"


def test_a_download_that_does_not_match_the_pins_is_refused_and_never_cached(tmp_path: Path, mvn: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(PrerequisiteError, match=r"slf4j-api-2\.0\.17\.jar has SHA-256"):
        fetch(kafka({**pins(FILES), "slf4j-api-2.0.17.jar": "0" * 64}), cache)
    assert list(cache.iterdir()) == []


def test_relocking_pins_what_was_downloaded_and_replaces_the_cached_copy(tmp_path: Path, mvn: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    folder_of(cache, {"old-1.0.jar": b"old"})
    target = fetch(kafka(sha256={"old-1.0.jar": pins({"x": b"old"})["x"]}), cache, relock=True)
    assert sorted(path.name for path in target.iterdir()) == sorted(FILES)
    assert mvn.exists(), "relocking downloads even though a cached copy exists"


def test_a_distribution_that_is_not_transitive_fetches_each_artifact_alone(tmp_path: Path, mvn: Path) -> None:
    keycloak = Distribution("keycloak", "26.0.0", ["org.keycloak:keycloak-quarkus-dist:26.0.0:zip"],
                            pins({"keycloak-quarkus-dist-26.0.0.zip":
                                  b"zip of org.keycloak:keycloak-quarkus-dist:26.0.0:zip"}),
                            transitive=False)
    fetch(keycloak, tmp_path / "cache")
    [call] = mvn.read_text().splitlines()
    assert call.startswith("-B -q -C dependency:copy -Dartifact=org.keycloak:keycloak-quarkus-dist:26.0.0:zip")


def test_maven_failing_stops_at_the_first_failure_with_its_own_words(tmp_path: Path, mvn: Path) -> None:
    dist = Distribution("keycloak", "26.0.0", ["org.keycloak:keycloak:0.0.0-does-not-exist", "org.keycloak:kc:26.0.0"],
                        pins({"kc-26.0.0.zip": b"zip of org.keycloak:kc:26.0.0"}), transitive=False)
    with pytest.raises(PrerequisiteError, match=r"Maven could not fetch keycloak 26\.0\.0 from Maven") as failed:
        fetch(dist, tmp_path / "cache")
    assert "[ERROR] Could not resolve org.keycloak:keycloak:0.0.0-does-not-exist" in str(failed.value)
    assert len(mvn.read_text().splitlines()) == 1, "nothing fetched after a failure"
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_pom_names_each_coordinate_with_its_packaging() -> None:
    pom = _pom(kafka(maven=["g:a:1", "org.keycloak:keycloak-quarkus-dist:26.0.0:zip"]))
    assert "<artifactId>kafka-dist</artifactId>" in pom
    assert "<dependency><groupId>g</groupId><artifactId>a</artifactId><version>1</version></dependency>" in pom
    assert ("<dependency><groupId>org.keycloak</groupId><artifactId>keycloak-quarkus-dist</artifactId>"
            "<version>26.0.0</version><type>zip</type></dependency>") in pom


def test_the_distributions_file_is_read_and_relocked_with_its_comments(tmp_path: Path) -> None:
    path = tmp_path / "distributions.yaml"
    path.write_text("# pinned\n# two lines\nkafka:\n  version: 4.1.1\n  maven: [g:a:1]\n  sha256: {old.jar: abc}\n"
                    "keycloak:\n  version: 26\n  maven: [g:k:26:zip]\n  transitive: false\n")
    loaded = load_distributions(path)
    assert loaded["kafka"] == Distribution("kafka", "4.1.1", ["g:a:1"], {"old.jar": "abc"}, True)
    assert loaded["keycloak"] == Distribution("keycloak", "26", ["g:k:26:zip"], {}, False)
    fetched = tmp_path / "kafka-4.1.1"
    fetched.mkdir()
    for name, content in FILES.items():
        (fetched / name).write_bytes(content)
    text = relocked(path, {"kafka": fetched})
    assert text.startswith("# pinned\n# two lines\n")
    (tmp_path / "relocked.yaml").write_text(text)
    assert load_distributions(tmp_path / "relocked.yaml")["kafka"].sha256 == pins(FILES)
