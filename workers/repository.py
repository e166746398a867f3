"""The model repository: the versions a worker serves, read from `{root}/{name}/{version}/`.

```
{root}/{name}/model.json             optional: {"version_policy": {"latest": 2}}
{root}/{name}/{version}/config.json  signature, batching, format, factory
{root}/{name}/{version}/model.pt2    the one model file (see `workers.formats`)
{root}/{name}/{version}/SHA256SUMS   every other file's SHA-256: marks the version complete
```

Reading and loading are blocking and happen off the event loop (`scan_repository`,
`VersionLoader`, `reconcile`); the result is an `Update` that `DirectoryModelRepository.apply`
swaps in at once, on the thread that owns the repository. A version that stops being served
drains: requests already queued for it still hold it, and it is gone (its memory freed) once
the last of them is answered.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Protocol

import pydantic
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.names import is_model_name
from workers.checksums import CHECKSUMS_FILENAME, verify_checksums
from workers.errors import (
    ModelConfigError,
    ModelLoadError,
    UnknownModelError,
    UnknownVersionError,
    WarmUpError,
)
from workers.formats import Forward, LoadRequest, ModelFormat, detect_format, load_model_file
from workers.models import (
    CONFIG_FILENAME,
    PRECISIONS,
    VARIABLE_DIM,
    LoadedModel,
    ModelConfig,
    torch_dtype,
)

log = structlog.get_logger(__name__)

MANIFEST_FILENAME = "model.json"


class VersionPolicy(BaseModel):
    """Which versions of a model are served, as in Triton: the newest N, a list, or all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latest: Annotated[int, Field(ge=1)] | None = None
    specific: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1)] | None = None
    all: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [self.latest is not None, self.specific is not None, self.all]
        if sum(chosen) > 1:
            raise ValueError("a version policy is one of latest, specific or all")
        if not any(chosen):
            object.__setattr__(self, "latest", 1)
        return self

    def select(self, versions: Collection[int]) -> set[int]:
        """The versions of ``versions`` this policy serves."""
        if self.all:
            return set(versions)
        if self.specific is not None:
            return set(versions) & set(self.specific)
        assert self.latest is not None
        return set(sorted(versions)[-self.latest :])

    def describe(self) -> str:
        """`latest: 2`, `specific: [1, 3]` or `all`."""
        if self.all:
            return "all"
        if self.specific is not None:
            return f"specific: {list(self.specific)}"
        return f"latest: {self.latest}"


def _policy_from_json(value: object) -> object:
    return {"all": True} if value == "all" else value


class ModelManifest(BaseModel):
    """`{root}/{name}/model.json`: what holds for every version of a model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version_policy: Annotated[VersionPolicy, pydantic.BeforeValidator(_policy_from_json)] = Field(
        default_factory=VersionPolicy
    )


class ModelRepository(Protocol):
    """Where the worker finds the models it serves."""

    generation: int
    """Changes whenever what serves does: caches keyed by model version compare it."""

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The served model; `version=None` means the newest served version."""
        ...

    def names(self) -> list[str]:
        """Names of the served models, sorted."""
        ...

    def models(self) -> list[LoadedModel]:
        """Every served model version, sorted by name then version."""
        ...


class VersionState(StrEnum):
    """Where a version stands in a worker: what `inferq-model list --worker` shows."""

    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


@dataclass(frozen=True, kw_only=True, slots=True)
class VersionDir:
    """A version directory as scanned: where it is and a fingerprint of its content."""

    name: str
    version: int
    path: Path
    fingerprint: str
    """Changes whenever `SHA256SUMS` or any file's size or modification time does."""

    @classmethod
    def at(cls, path: Path, *, name: str | None = None, version: int | None = None) -> VersionDir:
        """The version directory ``path`` on its own: its model is the directory above and
        its version its name, unless given (a writer's staging directory has neither)."""
        number = version if version is not None else parse_version(path)
        if number is None:
            raise ModelLoadError(f"{path} is not a version directory (a positive number)")
        return cls(name=name or path.parent.name, version=number, path=path,
                   fingerprint=fingerprint_of(path))  # fmt: skip


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelListing:
    """One model directory as scanned."""

    name: str
    policy: VersionPolicy
    versions: Mapping[int, VersionDir]
    manifest_error: str | None = None
    """Why `model.json` was refused: then what serves stays as it is."""
    manifest_fingerprint: str = ""


def parse_version(entry: Path) -> int | None:
    """The version a directory entry stands for, or None when it is not a version directory.

    Only plain positive decimals name versions: a writer's temporary name (`.3.tmp`) is none.
    """
    name = entry.name
    if not name.isascii() or not name.isdigit() or not entry.is_dir():
        return None
    version = int(name)
    return version if version >= 1 and str(version) == name else None


def fingerprint_of(version_dir: Path) -> str:
    """A cheap fingerprint of a version directory's content (no file is read but the list)."""
    digest = hashlib.sha256()
    try:
        digest.update((version_dir / CHECKSUMS_FILENAME).read_bytes())
    except OSError:
        digest.update(b"\x00no-checksums")
    for entry in sorted(version_dir.iterdir()):
        stat = entry.stat()
        digest.update(f"\x00{entry.name}\x00{stat.st_size}\x00{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _file_fingerprint(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def read_manifest(model_dir: Path) -> ModelManifest:
    """The model's `model.json`, or the defaults without one; ModelConfigError when invalid."""
    path = model_dir / MANIFEST_FILENAME
    try:
        return ModelManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return ModelManifest()
    except (OSError, pydantic.ValidationError) as error:
        raise ModelConfigError(f"bad {path}: {error}", model=model_dir.name) from error


def scan_repository(root: Path, names: Collection[str] | None = None) -> dict[str, ModelListing]:
    """Every model directory under ``root`` (or those in ``names``) and its version dirs.

    A directory whose name is not a plain identifier is skipped: no name that reaches a path
    (a request's model, a topic) can then point outside the repository.
    """
    if not root.is_dir():
        raise ModelLoadError(f"model repository {root} is not a directory")
    listings: dict[str, ModelListing] = {}
    for model_dir in sorted(root.iterdir()):
        name = model_dir.name
        if names is not None and name not in names:
            continue
        if not model_dir.is_dir():
            continue
        if not is_model_name(name):
            log.warning("ignoring repository entry", path=str(model_dir), reason="bad model name")
            continue
        manifest_error: str | None = None
        try:
            manifest = read_manifest(model_dir)
        except ModelConfigError as error:
            manifest, manifest_error = ModelManifest(), error.message
        versions: dict[int, VersionDir] = {}
        try:
            entries = sorted(model_dir.iterdir())
        except OSError:  # removed while we looked
            continue
        for entry in entries:
            version = parse_version(entry)
            if version is None:
                continue
            try:
                fingerprint = fingerprint_of(entry)
            except OSError:  # removed while we looked
                continue
            versions[version] = VersionDir(
                name=name, version=version, path=entry, fingerprint=fingerprint
            )
        listings[name] = ModelListing(
            name=name,
            policy=manifest.version_policy,
            versions=versions,
            manifest_error=manifest_error,
            manifest_fingerprint=_file_fingerprint(model_dir / MANIFEST_FILENAME),
        )
    return listings


def warm_up_batch_sizes(config: ModelConfig) -> tuple[int, ...]:
    """Batch sizes run at load: 1, 2 and the largest (a program fixed at 1 fails the 2)."""
    return tuple(sorted({1, min(2, config.max_batch_size), config.max_batch_size}))


def warm_up(model: LoadedModel, batch_sizes: Sequence[int] = (1,)) -> None:
    """Run a forward pass of zeros at each batch size (variable dims as 1); check its outputs."""
    for rows in batch_sizes:
        inputs = [
            torch.zeros(
                (rows, *(1 if dim == VARIABLE_DIM else dim for dim in spec.shape)),
                dtype=torch_dtype(spec.datatype),
                device=model.device,
            )
            for spec in model.config.inputs
        ]
        with torch.inference_mode():
            model.forward(inputs, model.warm_up_parameters(), rows=rows)


def module_memory_bytes(module: object) -> int | None:
    """Bytes of an `nn.Module`'s parameters and buffers (shared storage counted once)."""
    if not isinstance(module, torch.nn.Module):
        return None
    seen: dict[tuple[int, int], int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        for plain in _plain_tensors(tensor):
            storage = plain.untyped_storage()
            seen[(storage.data_ptr(), plain.device.index or 0)] = storage.nbytes()
    return sum(seen.values())


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors holding a tensor's memory: itself, or a subclass's inner tensors (a
    quantized weight is int8 data and scales)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return [tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor]
    names, _ = flatten()
    return [plain for name in names for plain in _plain_tensors(getattr(tensor, name))]


@dataclass(frozen=True, kw_only=True, slots=True)
class VersionStatus:
    """One version's state in this worker, with what its load measured."""

    model: str
    version: int
    state: VersionState
    format: ModelFormat | None = None
    load_seconds: float | None = None
    memory_bytes: int | None = None
    detail: str = ""
    """Why it failed, or what else to know."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadedVersion:
    """A loaded model with the fingerprint it was loaded from and what its load measured."""

    model: LoadedModel
    fingerprint: str
    load_seconds: float
    memory_bytes: int | None


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadFailure:
    """A version that could not be loaded, and why."""

    name: str
    version: int
    fingerprint: str
    reason: str
    message: str


class VersionLoader:
    """Loads one version directory: checksums, config, model file, warm-up. Blocking."""

    def __init__(self, *, device: torch.device, warmup: bool = True, quantize: bool = True) -> None:
        """quantize: False loads a version without its `quantization` (to compare with)."""
        self._device = device
        self._warmup = warmup
        self._quantize = quantize

    def _at_precision(self, module: Forward, config: ModelConfig, fmt: ModelFormat) -> Forward:
        """The module cast to the config's precision (floating parameters and buffers)."""
        dtype = PRECISIONS[config.precision]
        if dtype is None:
            return module
        if not isinstance(module, torch.nn.Module):
            raise ModelConfigError(
                f"precision {config.precision} needs a module to cast; a {fmt.value} model runs "
                "at the dtypes it was compiled for (compile it at that precision instead)"
            )
        if not _device_supports(self._device, dtype):
            raise ModelConfigError(
                f"precision {config.precision} is not supported on {self._device}"
            )
        cast: torch.nn.Module = module.to(dtype)
        # An exported program's lifted constants are plain attributes, not buffers.
        for submodule in cast.modules():
            for attribute, value in list(vars(submodule).items()):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    setattr(submodule, attribute, value.to(dtype))
        return cast

    def __call__(self, entry: VersionDir) -> LoadedVersion:
        """The loaded version; a ModelLoadError (with its `reason`) when it cannot be served."""
        name, version, path = entry.name, entry.version, entry.path
        label = f"{name}:{version}"
        started = time.perf_counter()
        try:
            verify_checksums(path)
            try:
                config = ModelConfig.model_validate_json((path / CONFIG_FILENAME).read_bytes())
            except (OSError, pydantic.ValidationError) as error:
                raise ModelConfigError(f"bad {CONFIG_FILENAME}: {error}") from error
            fmt = config.format or detect_format(path)
            module = load_model_file(
                fmt,
                LoadRequest(
                    path=path / fmt.filename,
                    device=self._device,
                    factory=config.factory,
                    label=label,
                ),
            )
            if not self._quantize:
                config = config.model_copy(update={"quantization": None})
            module = quantized(self._at_precision(module, config, fmt), config, fmt)
            model = LoadedModel(
                name=name,
                version=version,
                config=config,
                module=module,
                device=self._device,
                format=fmt,
            )
            if self._warmup:
                try:
                    warm_up(model, warm_up_batch_sizes(config))
                except Exception as error:
                    raise WarmUpError(f"warm-up forward failed: {error}") from error
        except ModelLoadError as error:
            raise type(error)(
                f"model {label}: {error.message}", model=name, version=version
            ) from error
        except Exception as error:  # a file removed mid-load, out of memory, a quantizer's bug
            raise ModelLoadError(
                f"model {label}: load failed: {type(error).__name__}: {error}",
                model=name,
                version=version,
            ) from error
        seconds = time.perf_counter() - started
        return LoadedVersion(
            model=model,
            fingerprint=entry.fingerprint,
            load_seconds=seconds,
            memory_bytes=module_memory_bytes(module),
        )


def open_version(
    version_dir: Path, *, device: torch.device | None = None, warmup: bool = False
) -> LoadedModel:
    """Load one version directory on its own (tools, benchmarks): checksums, config, module.

    The model is named after the directory above ``version_dir``; ModelLoadError when the
    version cannot be served.
    """
    loader = VersionLoader(device=device or torch.device("cpu"), warmup=warmup)
    return loader(VersionDir.at(version_dir)).model


def quantized(module: Forward, config: ModelConfig, fmt: ModelFormat) -> Forward:
    """The module with its `nn.Linear` layers quantized as the config asks (or as it is)."""
    if config.quantization is None:
        return module
    if not isinstance(module, torch.nn.Module) or not any(
        isinstance(layer, torch.nn.Linear) for layer in module.modules()
    ):
        raise ModelConfigError(
            f"quantization {config.quantization} replaces nn.Linear layers, and this "
            f"{fmt.value} model has none to replace: serve its weights with a factory "
            "(safetensors or state_dict), or quantize before exporting"
        )
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return module


def _device_supports(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == "cuda" and dtype is torch.bfloat16:
        return bool(torch.cuda.is_bf16_supported())
    return True  # fp16 on any CUDA device; on CPU both run (the warm-up proves the module does)


@dataclass(frozen=True, kw_only=True, slots=True)
class Update:
    """What serves after a reconcile: the chosen versions, and the loads that failed."""

    serving: Mapping[str, Mapping[int, LoadedVersion]]
    failures: Sequence[LoadFailure] = ()


class Loader(Protocol):
    """Loads a version directory (`VersionLoader`, or a stand-in in a test)."""

    def __call__(self, entry: VersionDir) -> LoadedVersion: ...


def reconcile(
    listings: Mapping[str, ModelListing],
    *,
    serving: Mapping[str, Mapping[int, LoadedVersion]],
    failed: Mapping[tuple[str, int], str],
    load: Loader,
) -> Update:
    """Decide what serves, loading what is new or changed. Blocking; reads no shared state.

    serving: what serves now. failed: (name, version) → the fingerprint that failed to load;
    such a version is not tried again until its directory changes.
    A version's policy picks among the versions that can load: when the newest fails, the
    policy falls back to older ones, and a version that serves keeps serving until what
    replaces it has loaded. A serving version whose files change is loaded again beside it;
    if that fails, the loaded copy keeps serving.
    """
    chosen: dict[str, dict[int, LoadedVersion]] = {}
    failures: list[LoadFailure] = []
    for name, listing in listings.items():
        current = serving.get(name, {})
        if listing.manifest_error is not None:
            # A broken model.json changes nothing: what serves keeps serving, as it is.
            if current:
                chosen[name] = dict(current)
            if failed.get((name, 0)) != listing.manifest_fingerprint:
                failures.append(
                    LoadFailure(name=name, version=0, fingerprint=listing.manifest_fingerprint,
                                reason="config", message=listing.manifest_error)
                )  # fmt: skip
            continue
        candidates = {
            version: entry
            for version, entry in listing.versions.items()
            if failed.get((name, version)) != entry.fingerprint or version in current
        }
        picked: dict[int, LoadedVersion] = {}
        while True:
            wanted = sorted(listing.policy.select(candidates), reverse=True)
            missing = [version for version in wanted if version not in picked]
            if not missing:
                break
            for version in missing:
                entry = candidates[version]
                present = current.get(version)
                if present is not None and (
                    present.fingerprint == entry.fingerprint
                    or failed.get((name, version)) == entry.fingerprint
                ):
                    picked[version] = present
                    continue
                try:
                    picked[version] = load(entry)
                except ModelLoadError as error:
                    failures.append(
                        LoadFailure(name=name, version=version, fingerprint=entry.fingerprint,
                                    reason=error.reason, message=error.message)
                    )  # fmt: skip
                    if present is not None:
                        picked[version] = present  # the loaded copy keeps serving
                        continue
                    del candidates[version]
                    break  # the policy may now pick an older version
        picked = {version: picked[version] for version in listing.policy.select(candidates)}
        if picked:
            chosen[name] = picked
    return Update(serving=chosen, failures=failures)


@dataclass(frozen=True, kw_only=True, slots=True)
class Change:
    """What an `apply` changed: for logs, metrics and the worker's subscriptions."""

    added: Sequence[LoadedVersion] = ()
    retired: Sequence[tuple[str, int]] = ()
    """(name, version) of the versions that started draining; not the models themselves,
    which must be free to go as soon as no request holds them."""
    failures: Sequence[LoadFailure] = ()
    names_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.retired or self.names_changed)


@dataclass(kw_only=True, slots=True)
class _Draining:
    ref: weakref.ref[LoadedModel]
    status: VersionStatus


@dataclass(slots=True)
class _State:
    serving: dict[str, dict[int, LoadedVersion]] = field(default_factory=dict)
    latest: dict[str, LoadedModel] = field(default_factory=dict)
    failed: dict[tuple[str, int], LoadFailure] = field(default_factory=dict)
    draining: list[_Draining] = field(default_factory=list)


class DirectoryModelRepository:
    """The versions served from a repository directory; owned by one thread (the loop's).

    `load()` reads it once at start; a `ModelReloader` then calls `scan`/`reconcile` off the
    loop and `apply` on it. `get` never blocks and never sees a half-applied update.
    """

    def __init__(
        self,
        *,
        root: Path,
        device: torch.device,
        names: Collection[str] | None = None,
        warmup: bool = True,
    ) -> None:
        """Configure; nothing is read until `load()`.

        root: directory holding one subdirectory per model name.
        device: where modules are loaded and run.
        names: model names to serve; None serves every model under `root`, new ones included.
        warmup: run forward passes of zeros at load to catch broken modules.
        """
        if isinstance(names, str):
            raise TypeError("names must be a collection of model names, not one string")
        if names is not None and (not names or not all(names)):
            raise ValueError(f"names must be None or non-empty model names, got {names!r}")
        self.root = root
        self.device = device
        self.wanted = frozenset(names) if names is not None else None
        self.loader = VersionLoader(device=device, warmup=warmup)
        self._state = _State()
        self.generation = 0
        """Counts applied changes: caches keyed by model version compare it."""

    # --- reading (blocking, any thread) ----------------------------------------------------

    def scan(self) -> dict[str, ModelListing]:
        """The repository's models and versions on disk now. Blocking."""
        return scan_repository(self.root, self.wanted)

    def reconcile(self, listings: Mapping[str, ModelListing]) -> Update:
        """What should serve given ``listings``, loading what it needs. Blocking.

        Reads a snapshot of the current state; call `apply` with the result on the owner.
        """
        state = self._state
        return reconcile(
            listings,
            serving={name: dict(versions) for name, versions in state.serving.items()},
            failed={key: failure.fingerprint for key, failure in state.failed.items()},
            load=self.loader,
        )

    def load(self) -> Change:
        """Load what the repository serves, at start. Blocking.

        ModelLoadError when a model named in `names` has no version that loads, or nothing
        at all can be served; a version that fails beside others that load is logged.
        """
        change = self.apply(self.reconcile(self.scan()))
        missing = sorted((self.wanted or frozenset()) - set(self._state.serving))
        failures = "; ".join(failure.message for failure in change.failures)
        if missing:
            raise ModelLoadError(
                f"models {missing} have no version that loads in {self.root}"
                + (f": {failures}" if failures else "")
            )
        if not self._state.serving:
            raise ModelLoadError(
                f"model repository {self.root} holds no model that loads"
                + (f": {failures}" if failures else "")
            )
        return change

    # --- the owner's side ------------------------------------------------------------------

    def apply(self, update: Update) -> Change:
        """Swap in ``update`` at once; versions no longer chosen start draining."""
        state = self._state
        before = {
            (name, version): served.model
            for name, versions in state.serving.items()
            for version, served in versions.items()
        }
        after = {
            (name, version): served.model
            for name, versions in update.serving.items()
            for version, served in versions.items()
        }
        added = [
            served
            for name, versions in update.serving.items()
            for version, served in versions.items()
            if before.get((name, version)) is not served.model
        ]
        retired = [model for key, model in before.items() if after.get(key) is not model]
        names_changed = set(state.serving) != set(update.serving)
        state.serving = {name: dict(versions) for name, versions in update.serving.items()}
        state.latest = {
            name: versions[max(versions)].model for name, versions in state.serving.items()
        }
        for served in added:
            state.failed.pop((served.model.name, served.model.version), None)
        for failure in update.failures:
            state.failed[(failure.name, failure.version)] = failure
        for model in retired:
            state.draining.append(
                _Draining(
                    ref=weakref.ref(model),
                    status=VersionStatus(
                        model=model.name,
                        version=model.version,
                        state=VersionState.DRAINING,
                        format=model.format,
                    ),
                )
            )
        change = Change(
            added=added,
            retired=[(model.name, model.version) for model in retired],
            failures=update.failures,
            names_changed=names_changed,
        )
        if change:
            self.generation += 1
        return change

    def forget_missing_failures(self, listings: Mapping[str, ModelListing]) -> None:
        """Drop the failures of versions no longer on disk (nothing to report of them)."""
        self._state.failed = {
            key: failure
            for key, failure in self._state.failed.items()
            if key[0] in listings
            and (
                key[1] in listings[key[0]].versions
                or (key[1] == 0 and listings[key[0]].manifest_error is not None)
            )
        }

    @property
    def draining(self) -> int:
        """Versions retired and still held by some request."""
        return sum(1 for item in self._state.draining if item.ref() is not None)

    def drained(self) -> list[VersionStatus]:
        """Versions whose draining is over (no request holds them): forget and return them."""
        done = [item.status for item in self._state.draining if item.ref() is None]
        self._state.draining = [item for item in self._state.draining if item.ref() is not None]
        return done

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The served model; `version=None` means the newest served version."""
        state = self._state
        if version is None:
            model = state.latest.get(name)
            if model is None:
                raise self._unknown(name)
            return model
        versions = state.serving.get(name)
        if versions is None:
            raise self._unknown(name)
        served = versions.get(version)
        if served is None:
            raise UnknownVersionError(
                f"model {name!r} has no version {version} served here; served: {sorted(versions)}",
                model=name,
                version=version,
            )
        return served.model

    def _unknown(self, name: str) -> UnknownModelError:
        return UnknownModelError(
            f"model {name!r} is not served here; served: {self.names()}", model=name
        )

    def names(self) -> list[str]:
        """Names of the served models, sorted."""
        return sorted(self._state.serving)

    def models(self) -> list[LoadedModel]:
        """Every served model version, sorted by name then version."""
        return [served.model for served in self._served()]

    def _served(self) -> Iterator[LoadedVersion]:
        for name in sorted(self._state.serving):
            versions = self._state.serving[name]
            for version in sorted(versions):
                yield versions[version]

    def statuses(self) -> list[VersionStatus]:
        """Every version this worker knows of: ready, failed and draining."""
        statuses = [
            VersionStatus(
                model=served.model.name,
                version=served.model.version,
                state=VersionState.READY,
                format=served.model.format,
                load_seconds=served.load_seconds,
                memory_bytes=served.memory_bytes,
            )
            for served in self._served()
        ]
        statuses += [
            VersionStatus(model=f.name, version=f.version, state=VersionState.FAILED,
                          detail=f"{f.reason}: {f.message}")
            for f in self._state.failed.values()
            if not any(s.model == f.name and s.version == f.version for s in statuses)
        ]  # fmt: skip
        ready = {(s.model, s.version) for s in statuses}
        # A version loaded again in place drains its old copy: one status per version.
        statuses += [
            item.status
            for item in self._state.draining
            if item.ref() is not None and (item.status.model, item.status.version) not in ready
        ]
        return sorted(statuses, key=lambda s: (s.model, s.version, s.state.value))
