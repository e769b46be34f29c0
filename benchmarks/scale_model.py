"""Evaluate the memory/time model (monoscope.scaling.memory) for 1M, 4M and 34M features at d_model 4096,
and check it against measured small runs on this machine; writes benchmarks/results/scale_model.json.

    PYTHONPATH=src python benchmarks/scale_model.py [SWEEP_DIR]

The check: (1) per-rank state bytes predicted vs the bytes of the SAE's parameters, gradients and Adam
state after a real step here (torch tensors counted); (2) seconds per step from the sweep's cost model vs
the seconds the sweep's runs measured (SWEEP_DIR, default /tmp/monoscope-sweep/real).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from monoscope.fileio import write_json_atomic
from monoscope.sae import SAEConfig, build_sae
from monoscope.scaling.memory import H100_IB, H100_NVLINK, min_feature_shards, step_model
from monoscope.train.config import TrainConfig
from monoscope.train.trainer import Trainer


def measured_state_bytes(d: int, n: int, k: int) -> int:
    sae = build_sae(SAEConfig(arch="topk", d_in=d, d_sae=n, k=k, normaliser=1.0, dtype="float32",
                              compute_dtype="float32"), seed=0)
    x = torch.randn(256, d)

    class Src:
        def __next__(self):  # type: ignore[no-untyped-def]
            from monoscope.store.batches import Batch
            return Batch(x, torch.arange(256))

        def state_dict(self):  # type: ignore[no-untyped-def]
            return {}

        def load_state_dict(self, s):  # type: ignore[no-untyped-def]
            pass

    tr = Trainer(sae, TrainConfig(arch="topk", k=k, tokens=512, width=n, batch_size=256, progress=False,
                                  checkpoint_every=0, device="cpu"), Src())
    tr.train_step()
    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    adam = sum(t.numel() * t.element_size() for st in tr.optimizer.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)
    return 2 * params + adam  # weights + gradients (set to None between steps, allocated during one) + Adam


def main(sweep_dir: str = "/tmp/monoscope-sweep/real") -> None:
    d, k, batch = 4096, 32, 4096
    plans = []
    for n in (1 << 20, 1 << 22, 34 * (1 << 20)):
        for hw in (H100_NVLINK, H100_IB):
            fs = min_feature_shards(d, n, k, batch, 1, hw)
            for dp in (1, 8):
                m = step_model(d, n, k, batch * dp, dp, fs, hw)
                plans.append({"features": n, "hardware": hw.name, "dp": dp, "fs": fs, "gpus": dp * fs,
                              "batch": batch * dp} | m.to_dict())
    single = [step_model(d, n, k, batch, 1, 1, H100_NVLINK).to_dict() | {"features": n}
              for n in (1 << 20, 1 << 22, 34 * (1 << 20))]
    check_mem = []
    for n in (576, 1152, 2304):
        pred = step_model(576, n, 32, 256, 1, 1, H100_NVLINK).state_bytes
        meas = measured_state_bytes(576, n, 32)
        check_mem.append({"d": 576, "n": n, "predicted_state_bytes": pred, "measured_state_bytes": meas,
                          "ratio": meas / pred})
    check_time = []
    sw = Path(sweep_dir) / "sweep.json"
    if sw.is_file():
        data = json.loads(sw.read_text())
        cm = data["cost_model"]
        for p in data["points"]:
            pred = (cm["intercept_s"] + cm["slope_s"] * p["width"]) * p["session_tokens"]
            check_time.append({"name": p["name"], "predicted_s": pred, "measured_s": p["train_seconds"],
                               "ratio": p["train_seconds"] / pred})
    res = {"command": "PYTHONPATH=src python benchmarks/scale_model.py " + " ".join(sys.argv[1:]),
           "model": "monoscope.scaling.memory (docs/scale.md)", "d_model": d, "k": k, "batch_per_replica": batch,
           "one_gpu_no_sharding": single, "plans": plans, "check_memory_cpu": check_mem,
           "check_time_cpu": check_time}
    write_json_atomic("benchmarks/results/scale_model.json", res)
    for s in single:
        print(f"1 GPU, n={s['features']:>9,}: state {s['state_bytes'] / 1e9:8.1f} GB, activations "
              f"{s['activation_bytes'] / 1e9:6.2f} GB, fits={s['fits']}")
    for p in plans:
        print(f"n={p['features']:>9,} {p['hardware'][-20:]:>20} dp={p['dp']} fs={p['fs']:>3} gpus={p['gpus']:>4}: "
              f"mem/rank {p['total_bytes'] / 1e9:5.1f} GB, comm {p['comm_bytes'] / 1e6:8.1f} MB, "
              f"step {p['step_s'] * 1e3:7.2f} ms (compute {p['compute_s'] * 1e3:.2f}, comm {p['comm_s'] * 1e3:.2f})")
    for c in check_mem:
        print(f"memory check n={c['n']}: predicted {c['predicted_state_bytes']:,.0f} measured "
              f"{c['measured_state_bytes']:,} ({c['ratio']:.3f})")
    if check_time:
        r = [c["ratio"] for c in check_time]
        print(f"time check: measured/predicted over {len(r)} runs: min {min(r):.2f} median {sorted(r)[len(r) // 2]:.2f}"
              f" max {max(r):.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
