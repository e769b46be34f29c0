"""`monoscope push` through huggingface_hub's real HTTP upload (create_repo, then upload_folder's preupload and
ndjson commit), offline, against `FakeHub` (tests/interop/fake_hub.py) on 127.0.0.1: what reaches the Hub (the
exact files, under --subfolder too, with the token), that the committed bytes load back as the same SAE, and the
one-line errors when the Hub refuses the commit, when the xet upload (the real Hub's way for weights) fails, and
when nothing answers.

Speed: two interpreters start at once, each taking seconds: the real `python -m monoscope.cli push`, and one
driver that runs the other pushes through `monoscope.cli.main` in a single interpreter. huggingface_hub reads
HF_ENDPOINT once, at import, into `huggingface_hub.constants.ENDPOINT`; the driver sets that constant for the
push to a dead endpoint."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from monoscope.interop import load_any
from monoscope.interop.published import push_plan
from monoscope.interop.saelens import write_saelens
from tests.interop.fake_hub import FakeHub
from tests.interop.helpers import CLI_DRIVER, K, Result, assert_close, float32, inputs, make_sae, run_parallel
from tests.steer.helpers import SRC

TOKEN = "hf_fakeTokenForTheLocalHub"
DENIED = "You don't have the rights to create a commit in me/denied"

@dataclass
class Pushed:
    tmp: Path
    src: Path  # the SAELens folder pushed
    expected: torch.Tensor  # the SAE's encode_raw on `inputs()`
    hub: FakeHub  # closed: what it received
    dead: str  # an endpoint nothing listens on
    results: dict[str, Result]


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """Pushes one SAE six times, in two processes at once: to me/my-sae (the real CLI); twice to subfolders of
    me/layers, to me/denied (the hub answers its commit 403), to me/xet (the hub wants the files through xet, which
    it does not serve) and to a dead endpoint (the driver)."""
    tmp = tmp_path_factory.mktemp("push-hub")
    sae = float32(make_sae("topk", {"k": K}, b_dec_to_input=True))
    src = tmp / "src"
    write_saelens(sae, src)
    expected = sae.encode_raw(inputs()).detach()
    hub = FakeHub().fail("commit", "me/denied", 403, DENIED).lfs("me/xet")
    dead = _dead_endpoint()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=os.pathsep.join([str(SRC), str(SRC.parent), env.get("PYTHONPATH", "")]))
    runs = [(["push", str(src), "me/layers", "--subfolder", "layer_3/topk", "--message", "layer 3", "--private"],
             None),
            (["push", str(src), "me/layers", "--subfolder", "layer_4/topk"], None),
            (["push", str(src), "me/denied"], None),
            (["push", str(src), "me/xet"], None),
            (["push", str(src), "me/my-sae"], dead)]
    procs = {"push": ([sys.executable, "-m", "monoscope.cli", "push", str(src), "me/my-sae"], env, None),
             "driver": ([sys.executable, "-c", CLI_DRIVER], env, json.dumps(runs))}
    try:
        results = run_parallel(procs, timeout=300)
    finally:
        hub.close()
    drv = results.pop("driver")
    assert drv.rc == 0, drv.err
    names = ["layer_3", "layer_4", "denied", "xet", "dead"]
    results.update({n: Result(**r) for n, r in zip(names, json.loads(drv.out), strict=True)})
    return Pushed(tmp, src, expected, hub, dead, results)


def _load(files: dict[str, bytes], folder: Path, prefix: str = "") -> torch.Tensor:
    """The encode of the SAE in the committed files under `prefix`, written to `folder`."""
    for path, data in files.items():
        if path.startswith(prefix):
            dst = folder / path[len(prefix):]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
    return load_any(folder).encode_raw(inputs()).detach()


def test_push_uploads_the_saelens_folder(pushed: Pushed) -> None:
    r, hub = pushed.results["push"], pushed.hub
    assert r.rc == 0, r.err
    [commit] = [c for c in hub.commits if c.repo_id == "me/my-sae"]
    assert r.out == (f"pushed {pushed.src} -> me/my-sae: {commit.url}\n"
                     "load it: monoscope eval hf:me/my-sae ...   (any stage takes hf:REPO[/SUBFOLDER])\n")
    assert commit.url == f"{hub.url}/me/my-sae/commit/{commit.oid}"
    assert (commit.revision, commit.summary, commit.files) == (
        "main", "monoscope push of src", ["cfg.json", "sae_weights.safetensors"])
    calls = [(q.method, q.path, q.status) for q in hub.requests if q.repo_id == "me/my-sae"]
    assert calls == [("POST", "/api/repos/create", 200), ("POST", "/api/models/me/my-sae/preupload/main", 200),
                     ("POST", "/api/models/me/my-sae/commit/main", 200)]
    assert {q.authorization for q in hub.requests} == {f"Bearer {TOKEN}"}  # every request, every process
    files = hub.files("me/my-sae")
    plan = pushed.tmp / "plan"
    assert sorted(files) == push_plan(pushed.src, plan) == ["cfg.json", "sae_weights.safetensors"]
    assert all(files[name] == (plan / name).read_bytes() for name in files)
    codes = _load(files, pushed.tmp / "back")
    assert torch.equal(codes, load_any(pushed.src).encode_raw(inputs()).detach())
    assert_close(codes, pushed.expected)


def test_push_to_subfolders_of_an_existing_repository(pushed: Pushed) -> None:
    """The second push finds me/layers created (409, which exist_ok absorbs) and adds its own folder."""
    hub = pushed.hub
    assert all(pushed.results[layer].rc == 0 for layer in ("layer_3", "layer_4")), pushed.results
    commits = [c for c in hub.commits if c.repo_id == "me/layers"]
    assert [(c.summary, c.files) for c in commits] == [
        ("layer 3", ["layer_3/topk/cfg.json", "layer_3/topk/sae_weights.safetensors"]),
        ("monoscope push of src", ["layer_4/topk/cfg.json", "layer_4/topk/sae_weights.safetensors"])]
    for layer, commit in zip(("layer_3", "layer_4"), commits, strict=True):
        out = pushed.results[layer].out
        assert out.splitlines()[0] == f"pushed {pushed.src} -> me/layers/{layer}/topk: {commit.url}"
    creates = [q.status for q in hub.requests if q.repo_id == "me/layers" and q.path == "/api/repos/create"]
    assert creates == [200, 409]
    assert (hub.repos["me/layers"].private, hub.repos["me/my-sae"].private) == (True, False)  # --private
    files = hub.files("me/layers")
    assert sorted(files) == ["layer_3/topk/cfg.json", "layer_3/topk/sae_weights.safetensors",
                             "layer_4/topk/cfg.json", "layer_4/topk/sae_weights.safetensors"]
    assert_close(_load(files, pushed.tmp / "layer_4", "layer_4/topk/"), pushed.expected)


def test_push_errors_are_one_line(pushed: Pushed) -> None:
    denied, dead = pushed.results["denied"], pushed.results["dead"]
    assert (denied.rc, denied.err) == (
        2, f"error: the Hub refused the push to me/denied (HTTP 403: {DENIED}): the token may not write to "
           "me/denied: use a token with write access to me (`hf auth login` or HF_TOKEN), then push again\n")
    assert pushed.hub.files("me/denied") == {}
    assert [q.status for q in pushed.hub.requests if q.path == "/api/models/me/denied/commit/main"] == [403]
    xet = pushed.results["xet"]  # the real Hub's answer for weights: hf_xet uploads them, its error is one line too
    assert xet.rc == 2 and xet.out == ""
    assert xet.err.startswith("error: the upload of me/xet's files to the Hub's xet storage failed (ConnectionError: ")
    assert xet.err.endswith("): check the network and that the token may write to me/xet, then push again\n")
    assert "/api/models/me/xet/xet-write-token/main" in xet.err and xet.err.count("\n") == 1
    assert pushed.hub.files("me/xet") == {}
    assert dead.rc == 2 and dead.out == ""
    assert re.fullmatch(rf"error: cannot reach the Hub at {re.escape(pushed.dead)} to push me/my-sae \(ConnectError: "
                        r"\[Errno \d+\] Connection refused\): check the network \(and HF_ENDPOINT if set\), then "
                        r"push again\n", dead.err), dead.err
