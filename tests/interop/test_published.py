"""Published SAEs: `hf:` and `saelens:` specs resolved offline from folders laid out like the Hub's (a local
repository folder, and huggingface_hub's own cache with HF_HUB_OFFLINE=1), used by a stage (steer) through the
CLI, and `push`: the exact folder it would upload and its one-line errors when it cannot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monoscope.interop import load_any
from monoscope.interop.common import InteropError
from monoscope.interop.published import push_plan, resolve_sae
from monoscope.interop.saelens import write_saelens
from monoscope.sae import SAEConfig, build_sae
from tests.steer.helpers import SRC, make_run

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "jbloom/GPT2-Small-SAEs-Reformatted"  # gpt2-small-res-jb in sae-lens's pretrained_saes.yaml
SAE_ID = "blocks.8.hook_resid_pre"


def _gpt2_sized_sae(folder: Path) -> torch.Tensor:
    sae = build_sae(SAEConfig(arch="topk", d_in=768, d_sae=32, k=4, normaliser=1.0, hook="resid_pre.8",
                              compute_dtype="float32"), seed=3)
    write_saelens(sae, folder)
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(0))
    return sae.encode_raw(x)


def _hub_cache(root: Path) -> tuple[Path, torch.Tensor]:
    """huggingface_hub's cache layout: models--OWNER--NAME/refs/main -> snapshots/<commit>/<files>."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    codes = _gpt2_sized_sae(repo / "snapshots" / SHA / SAE_ID)
    return root, codes


def _env(tmp: Path, cache: Path | None = None, offline: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp / "hf-home"), MONOSCOPE_PUBLISHED=str(tmp / "published"),
               HF_HUB_OFFLINE="1" if offline else "0")
    if cache is not None:
        env["HF_HUB_CACHE"] = str(cache)
    return env


def _run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The CLI in a subprocess with `env` (huggingface_hub reads HF_* once, at import)."""
    env = {**env, "PYTHONPATH": os.pathsep.join([str(SRC), str(SRC.parent), env.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


def test_hf_local_folder_resolves_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONOSCOPE_PUBLISHED", str(tmp_path / "published"))
    repo = tmp_path / "repo"
    codes = _gpt2_sized_sae(repo / "layer_8" / "topk")
    folder = resolve_sae(f"hf:{repo}/layer_8/topk")
    assert folder.parent == tmp_path / "published"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "published.json", "sae_weights.safetensors"]
    rec = json.loads((folder / "published.json").read_text())
    assert rec == {"spec": f"hf:{repo}/layer_8/topk", "repo": str(repo / "layer_8" / "topk"), "subfolder": "",
                   "revision": None, "files": ["cfg.json", "sae_weights.safetensors"]}
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_any(folder).encode_raw(x), codes)
    mtime = (folder / "cfg.json").stat().st_mtime_ns
    assert resolve_sae(f"hf:{repo}/layer_8/topk") == folder and (folder / "cfg.json").stat().st_mtime_ns == mtime
    with pytest.raises(InteropError, match=r"holds no cfg\.json \(found: layer_8\); pass the subfolder of one SAE"):
        resolve_sae(f"hf:{repo}")


def test_saelens_release_from_offline_hub_cache(tmp_path: Path) -> None:
    cache, codes = _hub_cache(tmp_path / "hub")
    env = _env(tmp_path, cache)
    rc, _, err = _run(env, "convert", f"saelens:gpt2-small-res-jb/{SAE_ID}", "--to", "monoscope",
                        "--out", str(tmp_path / "conv"))
    assert rc == 0, err
    sae = load_any(tmp_path / "conv")
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sae.encode_raw(x), codes, atol=1e-6)
    rec = json.loads((tmp_path / "published" / f"saelens-gpt2-small-res-jb__{SAE_ID}" / "published.json").read_text())
    assert (rec["repo"], rec["subfolder"], rec["revision"]) == (REPO, SAE_ID, SHA)
    rc, _, err = _run(env, "convert", "saelens:gpt2-small-res-jb/blocks.99.nope", "--to", "monoscope",
                      "--out", str(tmp_path / "c2"))
    assert rc == 2 and err.startswith("error: release gpt2-small-res-jb has no SAE 'blocks.99.nope' (e.g. ")
    rc, _, err = _run(env, "convert", "saelens:no-such-release/x", "--to", "monoscope", "--out", str(tmp_path / "c3"))
    assert (rc, err.strip()) == (2, "error: release 'no-such-release' is not in sae-lens's pretrained_saes.yaml")
    rc, _, err = _run(env, "convert", "hf:someone/not-cached/sae", "--to", "monoscope", "--out", str(tmp_path / "c4"))
    assert (rc, err.strip()) == (2, "error: hf:someone/not-cached: not in the Hugging Face cache and HF_HUB_OFFLINE "
                                    "is set: download it once online (or unset HF_HUB_OFFLINE)")


def test_published_sae_works_in_a_stage(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """steer on `hf:` of a Hub-cache copy of a tiny SAE gives the same output as on the folder itself."""
    sae_dir = make_run(tmp_path / "run", tokenizer, with_db=False)
    cache = tmp_path / "hub"
    repo = cache / "models--me--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    write_saelens(load_any(sae_dir), repo / "snapshots" / SHA / "resid_post.1")
    model = str(tmp_path / "run" / "model")
    args = ["--feature", "3", "--add", "-2", "--prompt", "def add(a, b):", "--max-new-tokens", "4", "--json",
            "--model", model, "--device", "cpu", "--compute-dtype", "fp32"]
    env = _env(tmp_path, cache)
    rc1, out1, err1 = _run(env, "steer", str(sae_dir), *args)
    rc2, out2, err2 = _run(env, "steer", "hf:me/tiny/resid_post.1", *args)
    assert rc1 == 0 and rc2 == 0, err1 + err2
    a, b = json.loads(out1), json.loads(out2)
    assert a["steered"] == b["steered"] and a["default"] == b["default"]


def test_push_plan_and_errors(tmp_path: Path) -> None:
    src = tmp_path / "sl"
    _gpt2_sized_sae(src)
    assert push_plan(src, tmp_path / "stage", "saelens") == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "stage" / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input")} == {
        "architecture": "topk", "d_in": 768, "d_sae": 32, "k": 4, "apply_b_dec_to_input": True}
    assert cfg["metadata"]["hook_name"] == "blocks.8.hook_resid_pre"
    assert push_plan(src, tmp_path / "stage2", "monoscope") == ["cfg.json", "sae.safetensors"]
    assert json.loads((tmp_path / "stage2" / "cfg.json").read_text())["format"] == "monoscope-sae"
    rc, _, err = _run(_env(tmp_path), "push", str(src), "me/my-sae")
    assert (rc, err.strip()) == (2, "error: cannot push while HF_HUB_OFFLINE is set: unset it (pushing needs the Hub)")
    rc, _, err = _run(_env(tmp_path, offline=False), "push", str(src), "me/my-sae")
    assert (rc, err.strip()) == (2, "error: no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push "
                                    "again")
    rc, _, err = _run(_env(tmp_path, offline=False), "push", str(src), "not a repo")
    assert (rc, err.strip()) == (2, "error: repository id 'not a repo': expected OWNER/NAME")
