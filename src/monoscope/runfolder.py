"""The run-folder layout in one place: where `monoscope run` puts each stage's output, and where a
stage looks for a sibling's output by default.

    runs/<name>/
      acts/                      activation store (capture)
      sae/                       the main SAE (train)
      sae-<width>/               the second, narrower SAE, for feature splitting (train)
      eval/                      metrics.json + plots of sae/ (eval)
      features/features.db       feature database of sae/ (features, explain)
      sae-<width>-features/      feature database of sae-<width>/ (features)
      audit/                     report.html, report.json, packs/, steer/ of the concept audit of sae/ (audit)

An SAE folder outside this layout keeps its outputs beside it: `<folder>-eval`, `<folder>-features`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAIN_SAE = "sae"
ACTS = "acts"
EVAL = "eval"
FEATURES = "features"
FEATURES_DB = "features.db"
AUDIT = "audit"


def _named(sae_dir: Path | str) -> Path:
    sae_dir = Path(sae_dir)
    return sae_dir.resolve() if sae_dir.name in ("", ".", "..") else sae_dir  # "." has no usable name


def eval_dir_for(sae_dir: Path | str) -> Path:
    """`runs/x/sae` -> `runs/x/eval`; any other SAE folder -> `<folder>-eval`."""
    sae_dir = _named(sae_dir)
    return sae_dir.parent / EVAL if sae_dir.name == MAIN_SAE else sae_dir.with_name(sae_dir.name + "-eval")


def features_dir_for(sae_dir: Path | str) -> Path:
    """`runs/x/sae` -> `runs/x/features`; any other SAE folder -> `<folder>-features` (beside the SAE
    folder, not inside it: that folder belongs to the SAE format and may be converted or copied alone)."""
    sae_dir = _named(sae_dir)
    return sae_dir.parent / FEATURES if sae_dir.name == MAIN_SAE else sae_dir.with_name(sae_dir.name + "-features")


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (nothing is created here)."""

    root: Path
    small_width: str = "4x"
    """Width of the second SAE as given (`4x`, `2304`): it names its folder `sae-<width>`."""

    @property
    def acts(self) -> Path:
        return self.root / ACTS

    @property
    def sae(self) -> Path:
        return self.root / MAIN_SAE

    @property
    def small_sae(self) -> Path:
        return self.root / f"{MAIN_SAE}-{self.small_width}"

    @property
    def eval(self) -> Path:
        return eval_dir_for(self.sae)

    @property
    def features(self) -> Path:
        return features_dir_for(self.sae)

    @property
    def features_db(self) -> Path:
        return self.features / FEATURES_DB

    @property
    def audit(self) -> Path:
        """`monoscope audit` of the main SAE: report.html, report.json (format in ARCHITECTURE.md)."""
        return self.root / AUDIT

    @property
    def small_features_db(self) -> Path:
        return features_dir_for(self.small_sae) / FEATURES_DB
