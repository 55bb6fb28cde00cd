"""A steering-vector artifact: the vectors plus everything needed to trust and reuse them.

`SteeringVectors` holds n vectors for one source site together with where and how they
were made: the target site, the method and its config, the model name, the prompts,
the objective per training step and at the end. It can apply itself to a model
(`with vectors.apply(model, 3): ...`), be indexed and sliced like a list, and be saved
to a single safetensors file whose metadata carries the rest as JSON.

Files are written atomically (temporary file, then rename), so an interrupted save never
leaves a half-written artifact. Loading reads tensors with safetensors only; a file that
is not a melbo_lens artifact, or a pickle, is refused and never unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .adapting import adapt
from .sites import HookSite
from .steering import steer

__all__ = [
    "SteeringVectors",
    "SteeringAdapters",
    "ArtifactError",
    "FORMAT",
    "ADAPTERS_FORMAT",
    "atomic_save_tensors",
    "load_artifact",
]

FORMAT = "melbo_lens.steering_vectors/1"
_RESUME = "resume."


class ArtifactError(ValueError):
    """A file is not a readable melbo_lens artifact."""


_TRAINING = ("losses", "objective", "steps_done")


class _Rows:
    """List-like behaviour shared by artifacts with one row per item.

    `_ITEMS` names the tensors whose first axis is the item axis; the training record
    (`losses`, `objective`, `steps_done`) and resume state ride along.
    """

    _ITEMS: tuple[str, ...] = ()
    _NOUN = "item"

    def _check_rows(self) -> None:
        n = len(self)
        for name in (*self._ITEMS, *_TRAINING):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(
                    f"{name} has {value.shape[0]} rows but there are {n} {self._NOUN}s"
                )

    def __len__(self) -> int:
        return getattr(self, self._ITEMS[0]).shape[0]

    def __getitem__(self, index: int | slice | Sequence[int]) -> Any:
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(
                    f"{self._NOUN} index {index} out of range for {len(self)} {self._NOUN}s"
                )
            index = [index]
        idx = torch.arange(len(self))[index]
        picked = {
            name: getattr(self, name)[idx]
            for name in (*self._ITEMS, *_TRAINING)
            if getattr(self, name) is not None
        }
        return replace(self, **picked, resume_state={})  # type: ignore[type-var]

    @property
    def complete(self) -> bool:
        """False when training was interrupted before every item finished."""
        steps_done = getattr(self, "steps_done", None)
        if steps_done is None:
            return True
        steps = int(getattr(self, "config", {}).get("steps", 0))
        return bool((steps_done >= steps).all())

    def _tensors(self) -> dict[str, Tensor]:
        """Everything `save` writes as tensors."""
        tensors = {
            name: getattr(self, name)
            for name in (*self._ITEMS, *_TRAINING)
            if getattr(self, name) is not None
        }
        for key, value in getattr(self, "resume_state", {}).items():
            tensors[_RESUME + key] = value
        return tensors

    def _save(self, path: str | os.PathLike[str], fmt: str, info: dict[str, Any]) -> Path:
        """Atomic safetensors file: the tensors, and `info` + provenance as JSON."""
        info = {
            **info,
            "target": None if self.target is None else self.target.to_dict(),  # type: ignore[attr-defined]
            **{k: getattr(self, k) for k in _PROVENANCE},
        }
        meta = {"format": fmt, "json": json.dumps(info, default=_jsonable)}
        return atomic_save_tensors(self._tensors(), path, meta)


_PROVENANCE = ("method", "config", "model_name", "prompts", "metadata")


def _loaded_fields(
    path: Any, info: dict[str, Any], tensors: dict[str, Tensor], default_method: str
) -> dict[str, Any]:
    """The constructor arguments every artifact shares, read back from a file."""
    try:
        target = None if info.get("target") is None else HookSite.from_dict(info["target"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path} has corrupt target metadata: {err!r}") from err
    return {
        "target": target,
        "method": info.get("method", default_method),
        "config": info.get("config", {}),
        "model_name": info.get("model_name"),
        "prompts": info.get("prompts"),
        "metadata": info.get("metadata", {}),
        **{name: tensors.get(name) for name in _TRAINING},
        "resume_state": {k[len(_RESUME) :]: v for k, v in tensors.items() if k.startswith(_RESUME)},
    }


@dataclass
class SteeringVectors(_Rows):
    """n steering vectors at one site, with provenance.

    Examples:
        >>> sv = SteeringVectors(torch.eye(3)[:2] * 4.0, HookSite(1), method="random")
        >>> len(sv), sv[1].vectors.tolist()
        (2, [[0.0, 4.0, 0.0]])
    """

    vectors: Float[Tensor, "n d_model"]
    site: HookSite
    target: HookSite | None = None
    method: str = "melbo"
    config: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    prompts: dict[str, Any] | None = None
    losses: Float[Tensor, "n steps"] | None = None
    objective: Float[Tensor, " n"] | None = None
    steps_done: Int[Tensor, " n"] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    resume_state: dict[str, Tensor] = field(default_factory=dict, repr=False)

    _ITEMS = ("vectors",)
    _NOUN = "vector"

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be [n, d_model], got {tuple(self.vectors.shape)}")
        self._check_rows()

    def __iter__(self) -> Iterator[Float[Tensor, " d_model"]]:
        return iter(self.vectors)

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    @property
    def radius(self) -> Float[Tensor, " n"]:
        return self.vectors.norm(dim=-1)

    # ------------------------------------------------------------------ use
    @contextmanager
    def apply(
        self, model: Any, index: int | Sequence[int] = 0, *, scale: float = 1.0
    ) -> Iterator[Any]:
        """Steer `model` with vector `index` (or one vector per batch row for a list).

        Examples:
            >>> with vectors.apply(model, 3):          # doctest: +SKIP
            ...     logits = model("Hello")
        """
        vec = self.vectors[index]
        with steer(model, self.site, vec, scale=scale) as m:
            yield m

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (tensors) with JSON metadata; atomic."""
        return self._save(path, FORMAT, {"site": self.site.to_dict()})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVectors:
        """Read an artifact written by `save`. Never unpickles."""
        tensors, meta = read_artifact(path, FORMAT)
        info = json.loads(meta["json"])
        if "vectors" not in tensors:
            raise ArtifactError(f"{path} has no 'vectors' tensor; the file is incomplete")
        try:
            site = HookSite.from_dict(info["site"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path} has corrupt site metadata: {err!r}") from err
        return cls(
            vectors=tensors["vectors"], site=site, **_loaded_fields(path, info, tensors, "melbo")
        )

    def __repr__(self) -> str:
        target = f" -> {self.target.name}" if self.target is not None else ""
        return (
            f"SteeringVectors(n={len(self)}, d_model={self.d_model}, site={self.site.name}"
            f"{target}, method={self.method!r}, model={self.model_name!r})"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, HookSite):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, slice):
        return {"slice": [value.start, value.stop, value.step]}
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in artifact metadata")


def _readable(tmp: str) -> None:
    """Give a mkstemp file (0600) the permissions a plain open() would: 0666 & ~umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same folder and a rename, so a
    crash or Ctrl-C leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_tensors(
    tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str]
) -> Path:
    """Save tensors to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(clean, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_artifact(path: str | os.PathLike[str], fmt: str) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a melbo_lens safetensors file of format `fmt`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no artifact at {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header
    header_len = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    looks_safetensors = head[8:9] == b"{" and 0 < header_len <= path.stat().st_size - 8
    if not looks_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise ArtifactError(
            f"{path} looks like a pickle / torch.save file; melbo_lens never unpickles. "
            "Load it yourself if you trust it, then wrap the tensor in SteeringVectors(...) "
            "and save() it as safetensors"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or "
            "of another format"
        ) from err
    if meta.get("format") != fmt:
        raise ArtifactError(
            f"{path} is a safetensors file but not a melbo_lens artifact of format {fmt!r} "
            f"(found format {meta.get('format')!r}); was it written by another tool?"
        )
    try:
        json.loads(meta["json"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path} has corrupt melbo_lens metadata: {err}") from err
    return tensors, meta


# ---------------------------------------------------------------------- adapters
ADAPTERS_FORMAT = "melbo_lens.steering_adapters/1"


@dataclass
class SteeringAdapters(_Rows):
    """n steering adapters on block `layer`'s MLP output weights, with provenance.

    Adapter k is the weight edit W_out' = W_out + radius · Ω_A[k] Ω_B[k]ᵀ (TransformerLens
    convention, W_out [d_mlp, d_model]; `melbo_lens.adapting` explains the hooks that
    apply it). Trained adapters have unit-norm columns, so `radius` is the whole scale.

    Examples:
        >>> a = torch.eye(4)[:, :1].expand(2, 4, 1); b = torch.eye(3)[:, :1].expand(2, 3, 1)
        >>> sa = SteeringAdapters(a, b, layer=1, radius=2.0)
        >>> len(sa), sa.rank, sa[1].weight_deltas().shape
        (2, 1, torch.Size([1, 4, 3]))
    """

    _ITEMS = ("omega_a", "omega_b")
    _NOUN = "adapter"

    omega_a: Float[Tensor, "n d_mlp r"]
    omega_b: Float[Tensor, "n d_model r"]
    layer: int
    radius: float
    target: HookSite | None = None
    method: str = "melbo_adapters"
    config: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    prompts: dict[str, Any] | None = None
    losses: Float[Tensor, "n steps"] | None = None
    objective: Float[Tensor, " n"] | None = None
    steps_done: Int[Tensor, " n"] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    resume_state: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        a, b = self.omega_a, self.omega_b
        if a.ndim != 3 or b.ndim != 3:
            raise ValueError(
                f"omega_a must be [n, d_mlp, r] and omega_b [n, d_model, r], got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
            raise ValueError(
                f"omega_a {tuple(a.shape)} and omega_b {tuple(b.shape)} disagree on the "
                "number of adapters n or the rank r"
            )
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        self.radius = float(self.radius)
        if not (self.radius > 0 and self.radius != float("inf")):
            raise ValueError(f"radius must be a finite number > 0, got {self.radius!r}")
        self._check_rows()

    @property
    def d_mlp(self) -> int:
        return self.omega_a.shape[1]

    @property
    def d_model(self) -> int:
        return self.omega_b.shape[1]

    @property
    def rank(self) -> int:
        return self.omega_a.shape[2]

    @property
    def site(self) -> HookSite:
        """Where the adapters write: `blocks.{layer}.hook_mlp_out`."""
        return HookSite(self.layer, "mlp_out")

    def weight_deltas(self, scale: float = 1.0) -> Float[Tensor, "n d_mlp d_model"]:
        """ΔW_out of each adapter: radius · scale · Ω_A Ω_Bᵀ, to add to `W_out`."""
        return self.radius * scale * (self.omega_a @ self.omega_b.transpose(-1, -2))

    # ------------------------------------------------------------------ use
    @contextmanager
    def apply(
        self, model: Any, index: int | Sequence[int] = 0, *, scale: float = 1.0
    ) -> Iterator[Any]:
        """Adapt `model` with adapter `index`; a list gives adapter j to the j-th block of
        batch rows (one adapter per row when the list is as long as the batch).

        Hooks, not weights: they are removed on exit, also when the body raises.

        Examples:
            >>> with adapters.apply(model, 3):  # doctest: +SKIP
            ...     logits = model("Hello")  # doctest: +SKIP
        """
        if not isinstance(index, int):
            index = [int(i) for i in index]
        with adapt(
            model,
            self.layer,
            self.omega_a[index],
            self.omega_b[index],
            scale=self.radius * scale,
        ) as m:
            yield m

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (tensors) with JSON metadata; atomic."""
        return self._save(path, ADAPTERS_FORMAT, {"layer": self.layer, "radius": self.radius})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringAdapters:
        """Read an artifact written by `save`. Never unpickles."""
        try:
            tensors, meta = read_artifact(path, ADAPTERS_FORMAT)
        except ArtifactError as err:
            if FORMAT in str(err):
                raise ArtifactError(
                    f"{path} holds steering vectors, not adapters; load it with "
                    "SteeringVectors.load"
                ) from err
            raise
        info = json.loads(meta["json"])
        missing = {"omega_a", "omega_b"} - set(tensors)
        if missing:
            raise ArtifactError(f"{path} has no {sorted(missing)} tensor; the file is incomplete")
        try:
            layer, radius = int(info["layer"]), float(info["radius"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path} has corrupt adapter metadata: {err!r}") from err
        return cls(
            omega_a=tensors["omega_a"],
            omega_b=tensors["omega_b"],
            layer=layer,
            radius=radius,
            **_loaded_fields(path, info, tensors, "melbo_adapters"),
        )

    def __repr__(self) -> str:
        target = f" -> {self.target.name}" if self.target is not None else ""
        return (
            f"SteeringAdapters(n={len(self)}, rank={self.rank}, d_mlp={self.d_mlp}, "
            f"d_model={self.d_model}, layer={self.layer}{target}, radius={self.radius:g}, "
            f"method={self.method!r}, model={self.model_name!r})"
        )


def load_artifact(path: str | os.PathLike[str]) -> SteeringVectors | SteeringAdapters:
    """Load whichever melbo_lens artifact `path` holds (vectors or adapters). Never unpickles.

    Examples:
        >>> art = load_artifact("run/adapters.safetensors")  # doctest: +SKIP
        >>> isinstance(art, SteeringAdapters)  # doctest: +SKIP
        True
    """
    try:
        return SteeringVectors.load(path)
    except ArtifactError as err:
        if ADAPTERS_FORMAT not in str(err):
            raise
    return SteeringAdapters.load(path)
