"""Reading deploy/kubernetes without a cluster: kustomize's tree walked by hand, the real
`kustomize build` where a binary is on this machine, and schema checks of every object.

- `tree(directory)`: every kustomization, component and manifest file a directory builds
  from, following `resources` and `components` the way kustomize does, and failing where
  kustomize would refuse: a missing path, or a directory that contains a kustomization
  already being built (kustomize's "cycle detected", e.g. an overlay inside its base).
- `render(directory)`: the objects `kubectl kustomize` (or `kustomize build`) makes of it;
  the test is skipped when neither is installed with kustomize 4 or newer (components).
- `validate(doc)`: built-in kinds against Kubernetes' own OpenAPI schemas (the PyPI package
  kubernetes-validate bundles them; strict: unknown fields are errors), the CRD kinds
  npuserve uses (prometheus-operator's ServiceMonitor, PodMonitor and PrometheusRule,
  KEDA's ScaledObject) against their CRDs' schemas in schemas/, made strict the same way.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
"""The oldest Kubernetes the manifests are meant for (gRPC probes are GA since 1.27) and the
newest kubernetes-validate knows."""
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization_file(directory: Path) -> Path:
    found = [directory / n for n in KUSTOMIZATION_NAMES if (directory / n).is_file()]
    assert len(found) == 1, f"{directory}: expected one kustomization file, found {found}"
    return found[0]


@dataclass
class Tree:
    """What a kustomization directory is built from."""

    kustomizations: list[Path] = field(default_factory=list)
    """Every kustomization and component file visited, the root's first."""
    manifests: list[Path] = field(default_factory=list)
    """Every resource file (not a kustomization) that goes into the build."""
    generated: list[Path] = field(default_factory=list)
    """Files read by configMapGenerator and secretGenerator."""


def tree(directory: Path) -> Tree:
    """Walk `directory`'s kustomization as kustomize does; fail where kustomize would."""
    out = Tree()
    _walk(directory.resolve(), (), out, component=False)
    return out


def _walk(directory: Path, chain: tuple[Path, ...], out: Tree, *, component: bool) -> None:
    for root in chain:
        # kustomize refuses to load a directory that contains one it is building already.
        assert not root.is_relative_to(directory), (
            f"cycle: {directory} contains {root}, which is being built from it (kustomize: "
            f"'cycle detected'); keep overlays outside their base")
    path = kustomization_file(directory)
    doc = yaml.safe_load(path.read_text())
    kind = doc.get("kind", "Kustomization")
    expected = "Component" if component else "Kustomization"
    assert kind == expected, f"{path}: kind {kind}, but it is used as a {expected}"
    out.kustomizations.append(path)
    chain = (*chain, directory)
    for entry in doc.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{path}: resource {entry} does not exist"
        if target.is_dir():
            _walk(target, chain, out, component=False)
        else:
            out.manifests.append(target)
    for entry in doc.get("components", []):
        target = (directory / entry).resolve()
        assert target.is_dir(), f"{path}: component {entry} is not a directory"
        _walk(target, chain, out, component=True)
    for generator in doc.get("configMapGenerator", []) + doc.get("secretGenerator", []):
        for entry in generator.get("files", []):
            source = (directory / entry.split("=", 1)[-1]).resolve()
            assert source.is_file(), f"{path}: generator file {entry} does not exist"
            out.generated.append(source)


@functools.cache
def kustomize_command() -> list[str] | None:
    """`kubectl kustomize` or `kustomize build` with kustomize 4 or newer, else None."""
    if kubectl := shutil.which("kubectl"):
        done = subprocess.run([kubectl, "version", "--client", "-o", "json"],
                              capture_output=True, text=True, timeout=60)
        version = json.loads(done.stdout or "{}").get("kustomizeVersion", "")
        if (m := re.match(r"v(\d+)", version)) and int(m.group(1)) >= 4:
            return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        done = subprocess.run([kustomize, "version"], capture_output=True, text=True,
                              timeout=60)
        if (m := re.search(r"v(\d+)\.", done.stdout)) and int(m.group(1)) >= 4:
            return [kustomize, "build"]
    return None


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects kustomize builds from `directory` (skips the test without kustomize)."""
    command = kustomize_command()
    if command is None:
        pytest.skip("no kubectl or kustomize with kustomize >= 4 on this machine")
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} {directory}:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject"}


@functools.cache
def crd_schema(kind: str) -> tuple[str, dict[str, Any]]:
    """(apiVersion, strict JSON schema) of a CRD kind from schemas/ (see its README)."""
    data = json.loads((SCHEMAS / f"{kind.lower()}.json").read_text())
    return data["apiVersion"], _strict(data["schema"])


def _strict(node: Any) -> Any:
    """The schema with unknown fields refused where the CRD lists its fields (the API
    server would prune them silently: a typo would vanish without a word)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


OBJECT_META = {"name", "namespace", "labels", "annotations"}
"""The metadata fields a manifest here may set (CRD schemas leave metadata open)."""


def validate(doc: dict[str, Any]) -> None:
    """Fail unless `doc` is a valid object of its kind (see the module's docstring)."""
    import kubernetes_validate

    kind = doc.get("kind", "")
    name = f"{kind}/{doc.get('metadata', {}).get('name', '?')}"
    if kind in CRD_KINDS:
        api_version, schema = crd_schema(kind)
        assert doc["apiVersion"] == api_version, f"{name}: apiVersion is {api_version}"
        assert set(doc["metadata"]) <= OBJECT_META, f"{name}: odd metadata {doc['metadata']}"
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
        assert not errors, f"{name}:\n" + "\n".join(
            f"  {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{name} (Kubernetes {version}): {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{name}: no schema for {doc.get('apiVersion')} {kind} in Kubernetes "
                        f"{version}")
