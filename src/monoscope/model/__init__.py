"""Models: load by id, folder or GGUF; hook points by name; a forward that stops at the hook."""

from monoscope.model.hooks import HOOK_KINDS, HookPoint, Layout, find_layout, parse_hook, run_to_hook
from monoscope.model.load import LoadedModel, ModelSource, from_module, load_model, resolve_source

__all__ = [
    "HOOK_KINDS",
    "HookPoint",
    "Layout",
    "LoadedModel",
    "ModelSource",
    "find_layout",
    "from_module",
    "load_model",
    "parse_hook",
    "resolve_source",
    "run_to_hook",
]
