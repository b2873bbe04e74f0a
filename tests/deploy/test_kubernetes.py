"""deploy/kubernetes builds, and every object in it is valid for Kubernetes, without a cluster.

Each buildable directory (deploy/kubernetes itself and each overlay) is walked the way
kustomize walks it (no missing path, no overlay inside its base) and rendered by the real
kustomize where kubectl has one; every object, rendered or as written in its file, is checked
against its kind's schema (tests/deploy/manifests.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import K8S, REPO, load_all, render, tree

KUSTOMIZATIONS = {p.parent: yaml.safe_load(p.read_text()) for p in K8S.rglob("kustomization.yaml")}
BUILDS = sorted(d for d, k in KUSTOMIZATIONS.items() if k.get("kind") != "Component")
"""What `kubectl apply -k` takes: deploy/kubernetes, its base and the overlays."""


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(out) == len(docs), "two objects of the same kind and name"
    return out


def test_the_builds_are_the_fleet_and_its_overlays() -> None:
    assert [rel(p) for p in BUILDS] == [
        "deploy/kubernetes", "deploy/kubernetes/base", "deploy/kubernetes/overlays/ascend"]


@pytest.mark.parametrize("directory", BUILDS, ids=rel)
def test_every_build_walks_without_a_cycle_or_a_missing_file(directory: Path) -> None:
    walked = tree(directory)
    assert walked.manifests, f"{rel(directory)} builds nothing"


def test_every_file_under_deploy_kubernetes_is_used_by_some_build() -> None:
    used: set[Path] = set()
    for directory in BUILDS:
        walked = tree(directory)
        used |= {*walked.kustomizations, *walked.manifests}
    files = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert files - used == set(), "files no build reads"


def test_the_cycle_kustomize_refuses_is_caught(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\n")
    (tmp_path / "a.yaml").write_text("kind: ConfigMap\n")
    inner = tmp_path / "overlay"
    inner.mkdir()
    (inner / "kustomization.yaml").write_text("resources: [../]\n")
    with pytest.raises(AssertionError, match="cycle"):
        tree(inner)


@pytest.mark.parametrize("directory", BUILDS, ids=rel)
def test_kustomize_builds_it_into_the_npuserve_namespace(directory: Path) -> None:
    docs = render(directory)
    objects = by_kind(docs)
    assert ("Namespace", "npuserve") in objects
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "npuserve", (doc["kind"],
                                                                    doc["metadata"]["name"])


def test_kustomize_builds_exactly_the_objects_of_the_files() -> None:
    """No object is made or lost on the way: the tests that read the files read the fleet."""
    written = [d for p in tree(K8S).manifests for d in load_all(p)]
    rendered = render(K8S)
    names = {(d["kind"], d["metadata"]["name"]) for d in written}
    assert names | {("ConfigMap", "npuserve-redis-acl")} == set(by_kind(rendered))
