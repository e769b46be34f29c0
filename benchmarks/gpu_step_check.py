"""On a CUDA GPU: peak memory and step time of real TopK training steps at d_model 4096, against the model
in monoscope.scaling.memory (per-rank state + activations; compute at the assumed MFU). Writes JSON to argv[1].

    PYTHONPATH=src python benchmarks/gpu_step_check.py benchmarks/results/gpu_step_check.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from monoscope.sae import SAEConfig, build_sae
from monoscope.scaling.cost import flops_per_token
from monoscope.scaling.memory import H100_NVLINK, step_model
from monoscope.store.batches import Batch
from monoscope.train.config import TrainConfig
from monoscope.train.trainer import Trainer


def main(out: str) -> None:
    dev = torch.device("cuda")
    d, k, batch = 4096, 32, 4096
    x = torch.randn(batch, d, device=dev)

    class Src:
        def __next__(self) -> Batch:
            return Batch(x, torch.arange(batch))

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, s: dict) -> None:
            pass

    rows = []
    for n in (16384, 65536, 262144):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        sae = build_sae(SAEConfig(arch="topk", d_in=d, d_sae=n, k=k, normaliser=1.0, dtype="float32",
                                  compute_dtype="bfloat16"), seed=0, device=dev)
        tr = Trainer(sae, TrainConfig(arch="topk", k=k, tokens=batch * 20, width=n, batch_size=batch, progress=False,
                                      checkpoint_every=0, device="cuda", dtype="bfloat16"), Src())
        for _ in range(3):
            tr.train_step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            tr.train_step()
        torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / 10
        m = step_model(d, n, k, batch, 1, 1, H100_NVLINK)
        rows.append({"features": n, "measured_peak_bytes": torch.cuda.max_memory_allocated(),
                     "predicted_bytes": m.total_bytes, "measured_step_s": step, "predicted_step_s": m.step_s,
                     "measured_tflops": float(flops_per_token("topk", d, n, k)) * batch / step / 1e12})
        print(rows[-1], flush=True)
        del tr, sae
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "d_model": d, "k": k,
           "batch": batch, "compute_dtype": "bfloat16", "rows": rows,
           "command": "PYTHONPATH=src python benchmarks/gpu_step_check.py OUT"}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
