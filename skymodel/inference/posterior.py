"""Posterior: samples of the free parameters plus what produced them, saved to disk.

On disk a Posterior is either one `.npz` file (samples + a JSON header) or a directory
holding `samples.npz` and `posterior.json`; both are written atomically (temporary file
or directory, then rename).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from skymodel._io import atomic_write

_FORMAT = "skymodel-posterior/1"


def _to_json(x: Any) -> Any:
    """JSON-able copy; numpy arrays become {"__ndarray__": list, "dtype": str}."""
    if isinstance(x, dict):
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json(v) for v in x]
    if isinstance(x, np.ndarray) or (hasattr(x, "__array__") and not isinstance(x, (str, bytes))):
        a = np.asarray(x)
        if a.ndim == 0:
            return a.item()
        return {"__ndarray__": a.tolist(), "dtype": str(a.dtype)}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def _from_json(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__ndarray__", "dtype"}:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


@dataclasses.dataclass
class Posterior:
    """Posterior samples and provenance.

    samples: site name -> (n, *shape) float64 numpy array (same n for all sites).
    method: what produced them ("svi-iaf", "nuts", "map", "multinest", ...).
    wall_time: seconds the inference took.
    diagnostics: free-form (R-hat, ESS, divergences, final loss, ...).
    log_evidence, log_evidence_err: ln Z and its error, where a nested sampler gives them.
    metadata: free-form (e.g. the run's config text).
    """

    samples: dict[str, np.ndarray]
    method: str
    wall_time: float = float("nan")
    diagnostics: dict = dataclasses.field(default_factory=dict)
    log_evidence: float | None = None
    log_evidence_err: float | None = None
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.samples:
            raise ValueError("Posterior needs at least one sampled parameter")
        self.samples = {str(k): np.asarray(v, dtype=np.float64) for k, v in self.samples.items()}
        sizes = {k: v.shape[0] if v.ndim else None for k, v in self.samples.items()}
        if any(s is None for s in sizes.values()):
            raise ValueError(f"every sample array needs a leading sample axis; got shapes "
                             f"{ {k: v.shape for k, v in self.samples.items()} }")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all sites need the same number of samples, got {sizes}")

    # ------------------------------------------------------------------ access

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.samples.values())).shape[0])

    @property
    def names(self) -> list[str]:
        return list(self.samples)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.samples[name]
        except KeyError:
            raise KeyError(f"no site {name!r}; sites: {self.names}") from None

    def quantiles(self, q: float | Sequence[float]) -> dict[str, np.ndarray]:
        """Quantiles q in [0, 1] of every site: name -> (len(q), *shape) (or (*shape) for
        scalar q)."""
        qa = np.asarray(q, dtype=np.float64)
        if np.any((qa < 0) | (qa > 1)) or not np.all(np.isfinite(qa)):
            raise ValueError(f"quantiles must lie in [0, 1], got {q}")
        return {k: np.quantile(v, qa, axis=0) for k, v in self.samples.items()}

    def mean(self) -> dict[str, np.ndarray]:
        return {k: v.mean(axis=0) for k, v in self.samples.items()}

    def median(self) -> dict[str, np.ndarray]:
        return {k: np.median(v, axis=0) for k, v in self.samples.items()}

    def sky(self, sky_model, index: int):
        """`sky_model` with its free parameters set to sample number `index`."""
        n = self.num_samples
        if not -n <= int(index) < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        return sky_model.with_values({k: v[int(index)] for k, v in self.samples.items()})

    def summary(self) -> str:
        """Text table: median, 16/84 and 2.5/97.5 percentiles (and R-hat, ESS if known)."""
        qs = self.quantiles([0.5, 0.16, 0.84, 0.025, 0.975])
        rhat = self.diagnostics.get("r_hat", {}) if isinstance(self.diagnostics, dict) else {}
        ess = self.diagnostics.get("ess", {}) if isinstance(self.diagnostics, dict) else {}
        rows = []
        for k, v in self.samples.items():
            shape = v.shape[1:]
            for idx in np.ndindex(*shape) if shape else [()]:
                label = k + (f"[{','.join(map(str, idx))}]" if idx else "")
                vals = [qs[k][j][idx] for j in range(5)]
                r = np.asarray(rhat[k])[idx] if k in rhat else math.nan
                e = np.asarray(ess[k])[idx] if k in ess else math.nan
                rows.append((label, *vals, r, e))
        width = max(len("parameter"), *(len(r[0]) for r in rows))
        head = ["median", "16%", "84%", "2.5%", "97.5%"]
        show_diag = bool(rhat or ess)
        if show_diag:
            head += ["r_hat", "ess"]
        lines = [f"{self.method}: {self.num_samples} samples"
                 + (f", ln Z = {self.log_evidence:.3f}" if self.log_evidence is not None else "")
                 + (f" +- {self.log_evidence_err:.3f}" if self.log_evidence_err is not None else "")]
        lines.append(f"{'parameter':<{width}}" + "".join(f"{h:>12}" for h in head))
        for r in rows:
            cells = list(r[1:6]) + (list(r[6:8]) if show_diag else [])
            lines.append(f"{r[0]:<{width}}" + "".join(f"{c:>12.5g}" for c in cells))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------------ disk

    def _header(self) -> dict:
        return {
            "format": _FORMAT,
            "method": self.method,
            "wall_time": self.wall_time,
            "diagnostics": _to_json(self.diagnostics),
            "log_evidence": self.log_evidence,
            "log_evidence_err": self.log_evidence_err,
            "metadata": _to_json(self.metadata),
            "sites": list(self.samples),
        }

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Save atomically: `path` ending in .npz -> one file; otherwise a directory with
        samples.npz and posterior.json. Overwrites an existing posterior there."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps(self._header(), indent=1)
        if path.suffix == ".npz":
            return atomic_write(path, lambda f: np.savez(
                f, __header__=np.asarray(header), **{f"site:{k}": v for k, v in self.samples.items()}))
        if path.exists() and not (path / "posterior.json").exists():
            raise ValueError(f"{path} exists and is not a saved Posterior; refusing to overwrite")
        tmpdir = pathlib.Path(tempfile.mkdtemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent))
        try:
            np.savez(tmpdir / "samples.npz", **{f"site:{k}": v for k, v in self.samples.items()})
            (tmpdir / "posterior.json").write_text(header)
            if path.exists():
                old = pathlib.Path(tempfile.mkdtemp(prefix=path.name + ".", suffix=".old", dir=path.parent))
                os.replace(path, old / "p")
                os.replace(tmpdir, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmpdir, path)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Posterior":
        """Read a Posterior written by `save`."""
        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no saved Posterior at {path}")
        if path.is_dir():
            header = json.loads((path / "posterior.json").read_text())
            with np.load(path / "samples.npz", allow_pickle=False) as z:
                arrays = {k: np.array(z[k]) for k in z.files}
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.array(z[k]) for k in z.files}
            header = json.loads(str(arrays.pop("__header__")))
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved skymodel Posterior")
        samples = {k[len("site:"):]: v for k, v in arrays.items() if k.startswith("site:")}
        samples = {k: samples[k] for k in header["sites"]}
        return cls(
            samples=samples,
            method=header["method"],
            wall_time=header["wall_time"],
            diagnostics=_from_json(header["diagnostics"]),
            log_evidence=header["log_evidence"],
            log_evidence_err=header["log_evidence_err"],
            metadata=_from_json(header["metadata"]),
        )


__all__ = ["Posterior"]
