"""Published SAEs in and out: `saelens:RELEASE/ID` and `hf:REPO[/SUBFOLDER]` as SAE folders, and `push`.

Every stage that takes an SAE folder goes through `resolve_sae` (monoscope.cli does it once for the `sae`
argument of any subcommand and `serve`'s PATH), so a published SAE works wherever a folder does:

    saelens:RELEASE/ID    looked up in sae-lens's `pretrained_saes.yaml` (installed sae-lens) -> hf:REPO/PATH
    hf:OWNER/NAME[/SUB]   the repository's snapshot through huggingface_hub (its cache; HF_HUB_OFFLINE=1 reads
                          only the cache), the SAE in folder SUB
    hf:/LOCAL/FOLDER[/SUB] or a folder: a local folder laid out like the Hub's repository

The files are linked (or copied) into `MONOSCOPE_PUBLISHED` (default `runs/published`)/<slug>, with
`published.json` recording where they came from, so outputs that live beside an SAE folder (`<slug>-eval`,
`<slug>-features`) never land in the Hugging Face cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monoscope.interop.common import CFG_NAME, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, InteropError

if TYPE_CHECKING:  # huggingface_hub is imported where the Hub is used: `monoscope.cli` imports this module
    from huggingface_hub.errors import HfHubHTTPError

PREFIXES = ("saelens:", "hf:")
PUBLISHED_JSON = "published.json"
SPARSITY = "sparsity.safetensors"
_FILES = (CFG_NAME, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, SPARSITY)


def is_published(spec: str | os.PathLike[str]) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIXES)


def published_root() -> Path:
    return Path(os.environ.get("MONOSCOPE_PUBLISHED", "runs/published"))


def saelens_lookup(release_and_id: str) -> tuple[str, str]:
    """`RELEASE/ID` -> (repo_id, path in the repo) from sae-lens's registry; one-line errors otherwise."""
    release, _, sae_id = release_and_id.partition("/")
    if not release or not sae_id:
        raise InteropError(f"saelens:{release_and_id}: expected saelens:RELEASE/ID, e.g. "
                           "saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError as e:
        raise InteropError("saelens:RELEASE/ID needs sae-lens's registry: pip install sae-lens, or pass "
                           "hf:REPO/SUBFOLDER") from e
    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = [r for r in directory if release.lower() in r.lower()][:5]
        raise InteropError(f"release {release!r} is not in sae-lens's pretrained_saes.yaml"
                           + (f" (similar: {', '.join(close)})" if close else ""))
    entry = directory[release]
    if sae_id not in entry.saes_map:
        ids = list(entry.saes_map)[:5]
        raise InteropError(f"release {release} has no SAE {sae_id!r} (e.g. {', '.join(ids)})")
    if entry.conversion_func:
        raise InteropError(f"release {release} is stored in its own format (sae-lens converts it with "
                           f"{entry.conversion_func}): load it in sae-lens and save_model() it to a folder, then pass "
                           "that folder")
    return entry.repo_id, entry.saes_map[sae_id]


def _split_hf(spec: str) -> tuple[str, str]:
    """`OWNER/NAME/SUB/DIR` -> (OWNER/NAME, SUB/DIR); a local folder (a path starting with /, . or ~) is its own
    'repository' with no subfolder."""
    if spec.startswith(("/", ".", "~")):
        p = Path(spec).expanduser()
        if not p.is_dir():
            raise InteropError(f"hf:{spec}: no such local folder")
        return str(p), ""
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise InteropError(f"hf:{spec}: expected hf:OWNER/NAME[/SUBFOLDER]")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _snapshot(repo: str, sub: str) -> tuple[Path, str | None]:
    """The local snapshot folder of `repo` (downloading only `sub`), and its commit when known."""
    if Path(repo).is_dir():
        return Path(repo), None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"{sub}/*"] if sub else None
    try:
        path = Path(snapshot_download(repo, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        raise InteropError(f"hf:{repo}: not in the Hugging Face cache" + (
            " and HF_HUB_OFFLINE is set: download it once online (or unset HF_HUB_OFFLINE)" if offline else
            " and the Hub is unreachable: connect, or pass a local folder laid out like the repository")) from e
    except RepositoryNotFoundError as e:
        raise InteropError(f"hf:{repo}: no such repository on the Hub (or it is private: set HF_TOKEN)") from e
    return path, path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None


def resolve_sae(spec: str | os.PathLike[str]) -> Path:
    """An SAE folder for `spec`: a published SAE is materialised under `published_root()`; a path is returned as
    is. Idempotent: the same source at the same revision is reused."""
    if not is_published(spec):
        return Path(spec)
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if kind == "saelens":
        repo, sub = saelens_lookup(rest)
    else:
        repo, sub = _split_hf(rest)
    snap, revision = _snapshot(repo, sub)
    src = snap / sub if sub else snap
    if not src.is_dir():
        raise InteropError(f"{spec}: the repository has no folder {sub!r}" if sub else f"{spec}: not a folder")
    files = [src / f for f in _FILES if (src / f).is_file()]
    if not any(f.name == CFG_NAME for f in files):
        present = ", ".join(sorted(p.name for p in src.iterdir())[:8]) or "nothing"
        raise InteropError(f"{spec}: {src} holds no {CFG_NAME} (found: {present}); pass the subfolder of one SAE")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "__", f"{kind}-{rest}".strip("/"))
    out = published_root() / slug
    record = {"spec": spec, "repo": repo, "subfolder": sub, "revision": revision,
              "files": sorted(f.name for f in files)}
    meta = out / PUBLISHED_JSON
    if meta.is_file():
        try:
            if json.loads(meta.read_text()) == record and all((out / f.name).is_file() for f in files):
                return out
        except (OSError, json.JSONDecodeError):
            pass
    from monoscope.fileio import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = out / f.name
        tmp = out / (f.name + ".tmp")
        tmp.unlink(missing_ok=True)
        real = f.resolve()  # the Hub cache holds symlinks into blobs/
        try:
            os.link(real, tmp)
        except OSError:
            shutil.copyfile(real, tmp)
        os.replace(tmp, dst)
    write_json_atomic(meta, record)
    return out


# ---------------------------------------------------------------------------------------------- push
def push_plan(sae_dir: str | os.PathLike[str], staging: str | os.PathLike[str], fmt: str = "saelens") -> list[str]:
    """Write the folder `push` uploads into `staging` (the SAE in SAELens or monoscope format, with its cfg)
    and return its file list (sorted, relative)."""
    from monoscope.interop.convert import convert

    staging = Path(staging)
    if fmt not in ("saelens", "monoscope"):
        raise InteropError(f"--format {fmt}: push writes saelens (read by sae-lens and monoscope) or monoscope")
    convert(sae_dir, fmt, staging, overwrite=True)
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and p.name != ".lock")


def push(sae_dir: str | os.PathLike[str], repo_id: str, *, subfolder: str | None = None, fmt: str = "saelens",
         private: bool = False, message: str | None = None) -> str:
    """Upload the SAE folder (converted to `fmt`) to `repo_id` on the Hub; returns the commit URL."""
    import tempfile

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise InteropError("cannot push while HF_HUB_OFFLINE is set: unset it (pushing needs the Hub)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", repo_id):
        raise InteropError(f"repository id {repo_id!r}: expected OWNER/NAME")
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise InteropError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    from huggingface_hub.errors import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="monoscope-push-") as tmp:
        staging = Path(tmp) / "sae"
        push_plan(sae_dir, staging, fmt)
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info: Any = api.upload_folder(folder_path=str(staging), repo_id=repo_id, path_in_repo=subfolder or None,
                                          commit_message=message or f"monoscope push of {Path(sae_dir).name}",
                                          ignore_patterns=[".lock"])
        except HfHubHTTPError as e:  # an OSError (as are hf_xet's): the CLI would blame the disk, in several lines
            raise _refused(repo_id, e) from e
        except _no_answer_errors() as e:
            raise InteropError(f"cannot reach the Hub at {api.endpoint} to push {repo_id} ({_one_line(e)}): check "
                               "the network (and HF_ENDPOINT if set), then push again") from e
        except _xet_errors() as e:  # the files the Hub keeps in LFS (the weights) go to its xet storage
            raise InteropError(f"the upload of {repo_id}'s files to the Hub's xet storage failed ({_one_line(e)}): "
                               f"check the network and that the token may write to {repo_id}, then push again") from e
    return str(getattr(info, "commit_url", info))


def _one_line(e: BaseException) -> str:
    said = str(e).strip().splitlines()
    return f"{type(e).__name__}: {said[0]}" if said else type(e).__name__


def _refused(repo_id: str, e: HfHubHTTPError) -> InteropError:
    """One line for an error answer of the Hub to `push`: its status, the first line of what it said, and the usual
    fix for that status."""
    from huggingface_hub.errors import RepositoryNotFoundError

    status = e.response.status_code
    said = (e.server_message or "").strip().splitlines()
    detail = f"HTTP {status}" + (f": {said[0].rstrip('.')}" if said else "")
    owner = repo_id.split("/")[0]
    if isinstance(e, RepositoryNotFoundError):
        fix = (f"the token cannot see or create {repo_id}: check that {owner} is your user name or one of your "
               "organisations (`hf auth whoami`)")
    elif status == 401:
        fix = "the token is not valid: run `hf auth login` or set HF_TOKEN to a valid token, then push again"
    elif status == 403:
        fix = (f"the token may not write to {repo_id}: use a token with write access to {owner} (`hf auth login` "
               "or HF_TOKEN), then push again")
    elif status == 429 or status >= 500:
        fix = "the Hub is busy or failing: push again later"
    else:
        fix = "check the repository id and the options, then push again"
    return InteropError(f"the Hub refused the push to {repo_id} ({detail}): {fix}")


def _no_answer_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP client raises when no answer comes (refused, unknown host, timed out, cut):
    httpx2's TransportError under huggingface_hub 2 (constraints.txt), httpx's under 1.x, requests' before.
    Looked up only once a push has failed."""
    import importlib

    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _xet_errors() -> tuple[type[BaseException], ...]:
    """What hf_xet raises when an upload to the Hub's xet storage fails: ConnectionError (the network, or an error
    answer), and its XetAuthenticationError (a PermissionError) and XetObjectNotFoundError (a FileNotFoundError)."""
    found: list[type[BaseException]] = [ConnectionError]
    try:
        import hf_xet
    except ImportError:
        return tuple(found)
    found += [getattr(hf_xet, n) for n in ("XetAuthenticationError", "XetObjectNotFoundError") if hasattr(hf_xet, n)]
    return tuple(found)
