"""benchmarks/train_vs_peers.py --crosscoder without the peer installed: the peer's child runs under the python
named by --lmsaes-python (llamascopium lives in a venv of its own, never a test dependency), the spec pair shares
one stream, per-hook held-out FVU is exact, and a missing peer python is a one-line refusal."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import train_vs_peers as tvp  # noqa: E402
from peers import HeldOut, evaluate  # noqa: E402


def test_child_command_uses_the_spec_python(tmp_path: Path) -> None:
    spec_path, out_path = tmp_path / "s.json", tmp_path / "o.json"
    cmd = tvp.child_command({"python": "/opt/peer/bin/python"}, spec_path, out_path)
    assert cmd == ["/opt/peer/bin/python", str(BENCH / "train_vs_peers.py"), "--child", str(spec_path),
                   "--child-out", str(out_path)]
    assert tvp.child_command({}, spec_path, out_path)[0] == sys.executable


def test_crosscoder_specs_pair_monoscope_with_the_peer() -> None:
    from monoscope.devices import bf16_is_fast

    args = argparse.Namespace(lmsaes_python="/v/bin/python", work="/w", lmsaes_grid_init=True, lmsaes_lr="2e-3")
    base = {"steps": 4, "batch": 8, "k": 2, "width": 32, "seed": 0, "dead_window": 8, "data": {}}
    specs = tvp.crosscoder_specs(args, base, [1, 2, 3])
    assert [s["name"] for s in specs] == ["monoscope_crosscoder", "lmsaes_crosscoder", "lmsaes_crosscoder_grid_init",
                                          "lmsaes_crosscoder_grid_init_lr0.002"]
    assert [s["kind"] for s in specs] == ["monoscope_trainer", "lmsaes", "lmsaes", "lmsaes"]
    assert [s.get("lr") for s in specs] == [None, None, None, 0.002]
    assert specs[0]["arch"] == "crosscoder" and "python" not in specs[0]
    assert {s["python"] for s in specs[1:]} == {"/v/bin/python"}
    assert [bool(s.get("grid_init")) for s in specs] == [False, False, True, True]
    assert {s["amp_dtype"] for s in specs[1:]} == {"bfloat16" if bf16_is_fast("cpu") else "float32"}
    assert all(s["crosscoder"] and s["eval_steps"] == [1, 2, 3] and s["k"] == 2 for s in specs)
    assert tvp.PEER_OF["crosscoder"] == "lmsaes_crosscoder"


def test_per_hook_fvu_of_side_by_side_rows() -> None:
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(64, 6, generator=g) * torch.tensor([1.0, 1, 1, 3, 3, 3])).to(torch.bfloat16)
    held = HeldOut(rows, blocks=2)
    x = rows.double()
    d0, d1 = ((x[:, :3] - x[:, :3].mean(0)) ** 2).sum().item(), ((x[:, 3:] - x[:, 3:].mean(0)) ** 2).sum().item()
    mean = x.mean(0).float()

    def recon(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_hat = torch.cat([xb[:, :3], mean[3:].expand(xb.shape[0], 3)], 1)  # hook 0 exact, hook 1 its mean
        return x_hat, torch.tensor(2.0 * xb.shape[0]), torch.tensor([True, False, True, False])

    m = evaluate(recon, held, 4)
    assert m["fvu_per_hook"][0] == 0.0
    assert m["fvu_per_hook"][1] == pytest.approx(1.0, rel=1e-6)
    assert m["fvu"] == pytest.approx(d1 / (d0 + d1), rel=1e-6)
    assert m["l0"] == 2.0 and m["dead_heldout_frac"] == 0.5
    assert "fvu_per_hook" not in evaluate(lambda xb: (xb, torch.tensor(0.0), torch.zeros(4, dtype=torch.bool)),
                                          HeldOut(rows), 4)


def test_crosscoder_without_the_peer_python_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "MONOSCOPE_LMSAES_PYTHON"}
    proc = subprocess.run([sys.executable, str(BENCH / "train_vs_peers.py"), "--crosscoder", "--lmsaes-python",
                           str(missing)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"--crosscoder needs --lmsaes-python: the python of a venv holding llamascopium (got '{missing}'); make one "
        "with `python3 -m venv /tmp/venv-lmsaes` and pip install torch==2.13.0, llamascopium and 'transformer-lens<4' "
        "into it")
