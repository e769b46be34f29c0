"""Published SAEs: `hf:` and `saelens:` specs resolved offline from folders laid out like the Hub's (a local
repository folder, and huggingface_hub's own cache with HF_HUB_OFFLINE=1), used by a stage (steer) through the
CLI, and `push`: the exact folder it would upload and its one-line errors when it cannot (its upload to a Hub:
test_push_hub.py).

Speed: every interpreter start costs seconds (torch, transformers, huggingface_hub, sae-lens imports), so one
module-scoped fixture starts all of them at once, in parallel: one real `python -m monoscope.cli` subprocess per
user-facing command (convert, steer, push), and one driver process that runs the remaining CLI invocations
through `monoscope.cli.main` in a single interpreter whose HF_* environment is set before huggingface_hub is
imported (it reads HF_* once, at import). Checks that need no Hub environment run in-process."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from monoscope.cli import main as cli_main
from monoscope.interop import load_any
from monoscope.interop.common import InteropError
from monoscope.interop.published import push_plan, resolve_sae
from monoscope.interop.saelens import write_saelens
from monoscope.sae import SAEConfig, build_sae
from tests.interop.helpers import CLI_DRIVER, Result, run_parallel
from tests.steer.helpers import SRC, make_run

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "jbloom/GPT2-Small-SAEs-Reformatted"  # gpt2-small-res-jb in sae-lens's pretrained_saes.yaml
SAE_ID = "blocks.8.hook_resid_pre"
STEER_ARGS = ["--feature", "3", "--add", "-2", "--prompt", "def add(a, b):", "--max-new-tokens", "4", "--json",
              "--device", "cpu", "--compute-dtype", "fp32"]

def _gpt2_sized_sae(folder: Path) -> torch.Tensor:
    sae = build_sae(SAEConfig(arch="topk", d_in=768, d_sae=32, k=4, normaliser=1.0, hook="resid_pre.8",
                              compute_dtype="float32"), seed=3)
    write_saelens(sae, folder)
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(0))
    return sae.encode_raw(x)


def _hub_repo(cache: Path, repo_id: str) -> Path:
    """huggingface_hub's cache layout: models--OWNER--NAME/refs/main -> snapshots/<commit>/<files>; returns the
    snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return repo / "snapshots" / SHA


def _env(tmp: Path, cache: Path | None = None, offline: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp / "hf-home"), MONOSCOPE_PUBLISHED=str(tmp / "published"),
               HF_HUB_OFFLINE="1" if offline else "0")
    if cache is not None:
        env["HF_HUB_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(SRC.parent), env.get("PYTHONPATH", "")])
    return env


@dataclass
class Hub:
    tmp: Path
    codes: torch.Tensor  # the gpt2-sized SAE's codes on a fixed input
    src: Path  # a saelens folder to push
    results: dict[str, Result]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Hub:  # type: ignore[no-untyped-def]
    """Builds an offline Hub cache (a gpt2-sized SAE of a sae-lens release, and a tiny run's SAE), then runs every
    process at once and waits for all of them."""
    tmp = tmp_path_factory.mktemp("published")
    cache = tmp / "hub"
    codes = _gpt2_sized_sae(_hub_repo(cache, REPO) / SAE_ID)
    sae_dir = make_run(tmp / "run", tokenizer, with_db=False)
    write_saelens(load_any(sae_dir), _hub_repo(cache, "me/tiny") / "resid_post.1")
    src = tmp / "sl"
    _gpt2_sized_sae(src)
    steer = [*STEER_ARGS, "--model", str(tmp / "run" / "model")]
    offline, online = _env(tmp, cache), _env(tmp, offline=False)
    cli = [sys.executable, "-m", "monoscope.cli"]
    procs = {  # name -> (argv, env, stdin)
        "convert": ([*cli, "convert", f"saelens:gpt2-small-res-jb/{SAE_ID}", "--to", "monoscope", "--out",
                           str(tmp / "conv")], offline, None),
        "steer_hf": ([*cli, "steer", "hf:me/tiny/resid_post.1", *steer], offline, None),
        "push_no_token": ([*cli, "push", str(src), "me/my-sae"], online, None),
        "driver": ([sys.executable, "-c", CLI_DRIVER], offline, json.dumps([[argv, None] for argv in [
            ["convert", "saelens:gpt2-small-res-jb/blocks.99.nope", "--to", "monoscope", "--out", str(tmp / "c2")],
            ["convert", "saelens:no-such-release/x", "--to", "monoscope", "--out", str(tmp / "c3")],
            ["convert", "hf:someone/not-cached/sae", "--to", "monoscope", "--out", str(tmp / "c4")],
            ["steer", str(sae_dir), *steer],
            ["push", str(src), "me/my-sae"],
        ]])),
    }
    results = run_parallel(procs, timeout=600)
    drv = results.pop("driver")
    assert drv.rc == 0, drv.err
    names = ["convert_nope", "convert_no_release", "convert_not_cached", "steer_folder", "push_offline"]
    results.update({n: Result(**r) for n, r in zip(names, json.loads(drv.out), strict=True)})
    return Hub(tmp, codes, src, results)


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


def test_saelens_release_from_offline_hub_cache(hub: Hub) -> None:
    r = hub.results
    assert r["convert"].rc == 0, r["convert"].err
    sae = load_any(hub.tmp / "conv")
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sae.encode_raw(x), hub.codes, atol=1e-6)
    rec = json.loads((hub.tmp / "published" / f"saelens-gpt2-small-res-jb__{SAE_ID}" / "published.json").read_text())
    assert (rec["repo"], rec["subfolder"], rec["revision"]) == (REPO, SAE_ID, SHA)
    assert r["convert_nope"].rc == 2
    assert r["convert_nope"].err.startswith("error: release gpt2-small-res-jb has no SAE 'blocks.99.nope' (e.g. ")
    assert (r["convert_no_release"].rc, r["convert_no_release"].err.strip()) == (
        2, "error: release 'no-such-release' is not in sae-lens's pretrained_saes.yaml")
    assert (r["convert_not_cached"].rc, r["convert_not_cached"].err.strip()) == (
        2, "error: hf:someone/not-cached: not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once "
           "online (or unset HF_HUB_OFFLINE)")


def test_published_sae_works_in_a_stage(hub: Hub) -> None:
    """steer on `hf:` of a Hub-cache copy of a tiny SAE gives the same output as on the folder itself."""
    a, b = hub.results["steer_folder"], hub.results["steer_hf"]
    assert a.rc == 0 and b.rc == 0, a.err + b.err
    ja, jb = json.loads(a.out), json.loads(b.out)
    assert ja["steered"] == jb["steered"] and ja["default"] == jb["default"]


def test_push_plan_and_errors(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    src = hub.src
    assert push_plan(src, tmp_path / "stage", "saelens") == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "stage" / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input")} == {
        "architecture": "topk", "d_in": 768, "d_sae": 32, "k": 4, "apply_b_dec_to_input": True}
    assert cfg["metadata"]["hook_name"] == "blocks.8.hook_resid_pre"
    assert push_plan(src, tmp_path / "stage2", "monoscope") == ["cfg.json", "sae.safetensors"]
    assert json.loads((tmp_path / "stage2" / "cfg.json").read_text())["format"] == "monoscope-sae"
    r = hub.results
    assert (r["push_offline"].rc, r["push_offline"].err.strip()) == (
        2, "error: cannot push while HF_HUB_OFFLINE is set: unset it (pushing needs the Hub)")
    assert (r["push_no_token"].rc, r["push_no_token"].err.strip()) == (
        2, "error: no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    assert cli_main(["push", str(src), "not a repo"]) == 2  # checked before anything reads the Hub's settings
    assert capsys.readouterr().err.strip() == "error: repository id 'not a repo': expected OWNER/NAME"
