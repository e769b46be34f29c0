"""Open what every steer/attribute command needs: the SAE, the model it reads, its features database.

The model defaults to the one the SAE's training store records (as `monoscope features` finds it);
the database (for "10x" strengths, labels, densities) is optional and found beside the SAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from monoscope.errors import MonoscopeError
from monoscope.model.hooks import HookPoint
from monoscope.model.load import LoadedModel
from monoscope.sae import SAE
from monoscope.steer.edits import SteerError
from monoscope.steer.intervene import check_pair


@dataclass
class Target:
    """A model, an SAE on one of its hooks, and (when built) the SAE's features database columns."""

    lm: LoadedModel
    sae: SAE
    hook: HookPoint
    sae_dir: Path | None = None
    max_acts: np.ndarray | None = None
    densities: np.ndarray | None = None
    db_path: Path | None = None
    _labels: dict[int, str] | None = None

    def max_act(self, feature: int) -> float | None:
        """The feature's max activation on the corpus (database), None when unknown."""
        if self.max_acts is None or not 0 <= feature < len(self.max_acts):
            return None
        v = float(self.max_acts[feature])
        return v if math.isfinite(v) else None

    def label(self, feature: int) -> str:
        """The database's cheap label of a feature ("" without a database)."""
        if self.db_path is None:
            return ""
        if self._labels is None:
            self._labels = {}
        if feature not in self._labels:
            from monoscope.features.db import FeatureDB

            with FeatureDB.open(self.db_path) as fdb:
                row = fdb.feature(feature)
            self._labels[feature] = str((row or {}).get("label") or "")
        return self._labels[feature]

    @property
    def context_len(self) -> int | None:
        cfg = self.lm.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        return int(n) if n else None

    def encode(self, text: str, *, chat: bool = False) -> Tensor:
        """Prompt -> ids [1, T] with the BOS first (as the store and the database saw every context)."""
        tok = self.lm.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise SteerError(f"the tokenizer of {self.lm.model_id} has no chat template: drop --chat")
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=False)
            ids = ids if isinstance(ids, Tensor) else torch.tensor([list(ids)])
        else:
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        bos = self.lm.special_ids()[0]
        if ids.shape[1] == 0 or int(ids[0, 0]) != bos:
            ids = torch.cat([torch.tensor([[bos]]), ids], 1)
        return ids.to(self.lm.device)

    def check_length(self, n_tokens: int, what: str = "the prompt") -> None:
        """One-line error when `n_tokens` do not fit the model's context."""
        ctx = self.context_len
        if ctx is not None and n_tokens > ctx:
            raise SteerError(f"{what} needs {n_tokens} tokens but {self.lm.model_id} has a {ctx}-token context: "
                             "shorten the prompt or lower --max-new-tokens")


def open_target(sae_dir: str | Path, *, model: str | None = None, device: str = "auto",
                compute_dtype: str = "auto", db: str | Path | None = None) -> Target:
    """Load the SAE, its model (checked: hook present, same width) and its database if there is one."""
    from monoscope.features.build import resolve_inputs
    from monoscope.features.db import FeatureDB
    from monoscope.features.show import default_db_path
    from monoscope.interop import load_any
    from monoscope.model import load_model

    sae_dir = Path(sae_dir)
    if not sae_dir.exists():
        raise MonoscopeError(f"SAE folder {sae_dir} does not exist: pass the folder monoscope train wrote")
    sae = load_any(sae_dir).eval()
    spec = resolve_inputs(sae, model, None)[0]
    lm = load_model(spec, device=device, compute_dtype=compute_dtype)  # type: ignore[arg-type]
    sae = sae.to(lm.device)
    hp = check_pair(lm, sae)
    t = Target(lm, sae, hp, sae_dir)
    path = Path(db) if db is not None else default_db_path(sae_dir)
    if db is not None or path.is_file():
        with FeatureDB.open(path) as fdb:
            n = fdb.n_features()
            if n and n != sae.cfg.d_sae:
                raise SteerError(f"features database {path} has {n} features but the SAE has {sae.cfg.d_sae}: "
                                 "it belongs to another SAE; rebuild it with monoscope features")
            t.max_acts, t.densities = fdb.column("max_act"), fdb.column("density")
        t.db_path = path
    return t
