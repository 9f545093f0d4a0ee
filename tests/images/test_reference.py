"""Image references parse the way docker parses them."""

import pytest

from cellvm.errors import InvalidReference
from cellvm.images import parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("node:24", "docker.io", "library/node", "24", None),
        ("node", "docker.io", "library/node", "latest", None),
        ("python:3.11", "docker.io", "library/python", "3.11", None),
        ("someone/tool:v1", "docker.io", "someone/tool", "v1", None),
        ("docker.io/library/node:24", "docker.io", "library/node", "24", None),
        ("index.docker.io/library/node", "docker.io", "library/node", "latest", None),
        ("ghcr.io/owner/repo/sub:1.0", "ghcr.io", "owner/repo/sub", "1.0", None),
        ("localhost/repo", "localhost", "repo", "latest", None),
        ("localhost:5000/a/b:c", "localhost:5000", "a/b", "c", None),
        ("127.0.0.1:5000/repo:tag", "127.0.0.1:5000", "repo", "tag", None),
        (f"repo@{DIGEST}", "docker.io", "library/repo", None, DIGEST),
        (f"host:1/repo:tag@{DIGEST}", "host:1", "repo", "tag", DIGEST),
        ("my_repo/name-with--dashes:tag_1.2-x", "docker.io", "my_repo/name-with--dashes", "tag_1.2-x", None),
    ],
)
def test_valid_references(text: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    reference = parse_reference(text)
    assert (reference.registry, reference.repository, reference.tag, reference.digest) == (registry, repository, tag, digest)


def test_identifier_prefers_the_digest_and_familiar_form_shortens_docker_hub() -> None:
    assert parse_reference(f"node:24@{DIGEST}").identifier == DIGEST
    assert parse_reference("node:24").identifier == "24"
    assert parse_reference("docker.io/library/node:24").familiar == "node:24"
    assert parse_reference("127.0.0.1:5000/x:1").familiar == "127.0.0.1:5000/x:1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " node",
        "Node:24",  # upper-case repository
        "node:",
        "node:-bad",
        ":24",
        "node@sha256:short",
        "node@md5:" + "a" * 32,  # an algorithm we cannot verify
        "node@" + DIGEST[:-1] + "G",
        "a//b",
        "a/../b",
        "host:port:5000/repo",
        "repo:" + "t" * 200,
        "-leading/dash",
    ],
)
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)
