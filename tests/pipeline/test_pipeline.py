"""`monoscope run` as an API on a tiny model: golden numbers of a deterministic CPU run, a rerun that
changes nothing, and a run killed inside each stage that resumes to the same artefacts."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from monoscope.cli import build_parser
from monoscope.pipeline import RunConfig, RunConfigError, RunResult, config_fields, run
from tests.pipeline.helpers import cli_args, db_tables, make_inputs, sha256, tiny_config

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("capture", "train", "train-small", "eval", "features", "audit")
STEP = {"capture": 1, "train": 2, "train-small": 3, "eval": 4, "features": 5, "audit": 7}
"""The number each stage's start line carries (explain, 6/7, is off in the tiny run)."""
METRIC_KEYS = ("fvu", "explained_variance", "mse", "l0_mean", "dead_frac", "dense_frac", "shrinkage_norm_ratio")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, RunResult]:
    """One uninterrupted tiny run: (model folder, corpus, run folder, result)."""
    root = tmp_path_factory.mktemp("pipeline")
    model, corpus = make_inputs(root)
    out = root / "ref"
    return model, corpus, out, run(tiny_config(out, model, corpus), echo=False)


def artefacts(out: Path) -> dict[str, Any]:
    """What a run computed, independent of where its folder is and of timings."""
    m = json.loads((out / "eval" / "metrics.json").read_text())
    got: dict[str, Any] = {
        "manifest": sha256(out / "acts" / "manifest.json"),
        "shards": {p.name: sha256(p) for p in sorted((out / "acts").glob("shard-*.safetensors"))},
        "sae": sha256(out / "sae" / "sae.safetensors"),
        "sae-2x": sha256(out / "sae-2x" / "sae.safetensors"),
        "metrics": {k: m[k] for k in ("store_rows", "heldout", "lm", "request")},
    }
    for db in (out / "features" / "features.db", out / "sae-2x-features" / "features.db"):
        tables = db_tables(db)
        tables["meta"] = [(k, v.replace(str(out), "<run>")) for k, v in tables["meta"]]
        got[db.parent.name] = tables
    report = json.loads((out / "audit" / "report.json").read_text().replace(str(out), "<run>"))
    for p in report["packs"]:
        p.pop("seconds")
    got["audit"] = {k: v for k, v in report.items() if k not in ("seconds", "n_reused")}
    return got


def tree(out: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under the run folder."""
    return {str(p.relative_to(out)): (sha256(p), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- golden values
# Measured on this tiny run (fp32, CPU) with the default thread count and with OMP_NUM_THREADS=1.
GOLDEN_STORE = {"fvu": 0.14408285822922245, "l0_mean": 4.0, "dead_frac": 0.16015625}
GOLDEN_HELDOUT = {"fvu": 0.14827627551818262, "l0_mean": 4.0, "dead_frac": 0.16796875}
GOLDEN_LM = {"ce_recovered": 0.5184768757964477, "ce_clean": 5.691878318786621, "ce_spliced": 5.684001513889858,
             "ce_zero": 5.6755202157156805}
GOLDEN_TOP_FEATURES = [224, 100, 150, 152, 4]
"""The 5 densest features of the main SAE (ties broken by id)."""
GOLDEN_AUDIT_BEST = {"people": 116, "code_types": 139}
"""The audit stage's best candidate per pack (highest AUROC on the pack) on the tiny run."""
GOLDEN_AUDIT_N = 0
"""How many of the tiny run's packs have a candidate with AUROC >= 0.8."""


def test_golden_values(reference: tuple[Path, Path, Path, RunResult]) -> None:
    *_, out, res = reference
    m = json.loads((out / "eval" / "metrics.json").read_text())
    import sqlite3

    conn = sqlite3.connect(str(out / "features" / "features.db"))
    top = [r[0] for r in conn.execute("SELECT id FROM features ORDER BY density DESC, id LIMIT 5")]
    conn.close()
    best = {k: (v or {}).get("feature") for k, v in res.audit.summary["best"].items()}
    print(json.dumps({"audit": best, "n_with_auroc": res.audit.summary["n_with_auroc"]}))
    print(json.dumps({"store": {k: m["store_rows"][k] for k in GOLDEN_STORE},
                      "heldout": {k: m["heldout"][k] for k in GOLDEN_HELDOUT},
                      "lm": {k: m["lm"][k] for k in GOLDEN_LM}, "top": top}))
    assert best == GOLDEN_AUDIT_BEST and res.audit.summary["n_with_auroc"] == GOLDEN_AUDIT_N
    assert json.loads((out / "audit" / "report.json").read_text())["summary"] == res.audit.summary
    for key, golden in (("store_rows", GOLDEN_STORE), ("heldout", GOLDEN_HELDOUT), ("lm", GOLDEN_LM)):
        for name, want in golden.items():
            assert m[key][name] == pytest.approx(want, rel=1e-4, abs=1e-7), f"{key}.{name}"
    assert top == GOLDEN_TOP_FEATURES
    assert res.eval.store.fvu == m["store_rows"]["fvu"]  # the API returns what metrics.json holds


# ------------------------------------------------------------------------------------------- reruns
def test_rerun_is_a_noop_stage_by_stage(reference: tuple[Path, Path, Path, RunResult]) -> None:
    model, corpus, out, first = reference
    assert [s.name for s in first.stages] == list(STAGES)
    assert not any(s.reused for s in first.stages)
    before = tree(out)
    again = run(tiny_config(out, model, corpus), echo=False)
    assert [(s.name, s.reused) for s in again.stages] == [(name, True) for name in STAGES]
    assert again.capture.new_tokens == 0 and again.stage("train").result.already_complete
    assert again.eval.reused and again.features.notes == ["already complete: nothing to do"]
    assert again.audit.reused and again.audit.summary == first.audit.summary
    after = tree(out)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], f"a rerun touched {changed}"


def _watch(proc: subprocess.Popen[str], lines: list[str], seen: threading.Event, marker: str) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            seen.set()


def _start_and_kill(args: list[str], env: dict[str, str], marker: str, delay: float) -> tuple[list[str], bool]:
    """Start `monoscope ARGS`, SIGKILL it `delay` seconds after `marker` appears on its stderr; (stderr lines,
    whether the kill ended it rather than its own exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "monoscope.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    seen = threading.Event()
    reader = threading.Thread(target=_watch, args=(proc, lines, seen, marker), daemon=True)
    reader.start()
    assert seen.wait(120), f"{marker!r} never appeared:\n{''.join(lines)}"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    reader.join(10)
    assert proc.returncode in (0, -signal.SIGKILL), f"the run failed:\n{''.join(lines)}"
    return lines, proc.returncode == -signal.SIGKILL


def test_killed_inside_each_stage_resumes_to_the_same_artefacts(
        reference: tuple[Path, Path, Path, RunResult], tmp_path: Path) -> None:
    """One folder; the n-th process is SIGKILLed at a random point inside stage n (after its start line and
    before its completion marker), and resumes stages 1..n-1; the last run completes it."""
    model, corpus, ref_out, ref = reference
    out = tmp_path / "killed"
    seed = int(os.environ.get("MONOSCOPE_KILL_SEED", "0"))
    rng = random.Random(seed)
    done_marker = {"capture": out / "acts" / "manifest.json", "train": out / "sae" / "cfg.json",
                   "train-small": out / "sae-2x" / "cfg.json", "eval": out / "eval" / "metrics.json",
                   "audit": out / "audit" / "report.json"}
    outputs = {"capture": ["acts"], "train": ["sae"], "train-small": ["sae-2x"], "eval": ["eval"],
               "features": ["features", "sae-2x-features"], "audit": ["audit"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    report = []
    for n, stage in enumerate(STAGES, start=1):
        delay = rng.uniform(0.05, 0.5) * ref.stage(stage).seconds
        for _attempt in range(4):
            marker = f"monoscope run [{STEP[stage]}/7]"
            lines, killed = _start_and_kill(cli_args(out, model, corpus), env, marker, delay)
            if not killed:
                inside = False
            elif stage == "features":  # the pass's work folder is there until the pass completes
                inside = not (out / "features" / "features.db").is_file() or (out / "features" / ".pass").exists()
            else:
                inside = not done_marker[stage].exists()
            if inside:
                break
            # this process was faster than the reference: the stage completed before the kill. Remove what it
            # and later stages wrote, and kill earlier
            for later in STAGES[n - 1:]:
                for name in outputs[later]:
                    shutil.rmtree(out / name, ignore_errors=True)
            delay /= 3
        else:
            pytest.fail(f"no kill landed inside {stage} (last delay {delay:.2f} s, seed {seed}):\n{''.join(lines)}")
        report.append(f"{stage} +{delay:.2f}s")
    try:
        res = run(tiny_config(out, model, corpus), echo=False)
    except Exception as e:  # say where the kills were, so the case can be replayed (MONOSCOPE_KILL_SEED)
        pytest.fail(f"the rerun after kills at {report} (seed {seed}) failed: {type(e).__name__}: {e}")
    # stages 1-5 were completed by the processes killed later; the audit was killed, so it resumes
    assert [(s.name, s.reused) for s in res.stages] == [(name, name != "audit") for name in STAGES]
    assert artefacts(out) == artefacts(ref_out), f"kills at {report} (seed {seed})"


# ------------------------------------------------------------------------------------------- the CLI is a thin wrapper
def test_every_config_field_is_a_run_option() -> None:
    args = build_parser().parse_args(["run"])
    mapped = {"feature_map": "no_map", "audit": "no_audit", "progress": "quiet"}
    for name in config_fields():
        assert hasattr(args, mapped.get(name, name)), f"RunConfig.{name} has no monoscope run option"
    settings = {n: getattr(args, n) for n in config_fields() if hasattr(args, n)}
    assert RunConfig(**settings) == RunConfig()  # the CLI's defaults are the API's


@pytest.mark.parametrize(("over", "message"), [
    ({"tokens": "nan"}, "--tokens 'nan': use a positive number of tokens such as 500000, 500k or 2M"),
    ({"train_tokens": "0"}, "--train-tokens '0': use a positive number of tokens"),
    ({"compute_dtype": "fp16"}, "--compute-dtype 'fp16': use one of auto, fp32, bf16"),
    ({"arch": "relu"}, "--arch 'relu': use one of relu-l1, topk, batchtopk, jumprelu, matryoshka, gated"),
    ({"model": ""}, "--model '': give a Hugging Face id"),
    ({"out": " "}, "--out ' ': give a run folder such as runs/default"),
    ({"width": "wide"}, "--width 'wide': use a count such as 9216 or a multiple of d_model such as 16x"),
    ({"small_width": "16x"}, "--small-width 16x equals --width"),
    ({"contexts_per_shard": 100}, "--contexts-per-shard 100 must be a multiple of --batch-contexts 32"),
    ({"train_batch_size": 8192, "train_tokens": "4k"}, "--train-tokens 4k is less than one batch"),
    ({"explain_llm": "openai:gpt-4o-mini"}, "--explain-llm openai:gpt-4o-mini needs --explain-endpoint"),
    ({"outlier_factor": -1}, "--outlier-factor -1: use a factor >= 0"),
    ({"audit_steer_top": -1}, "--audit-steer-top -1: use a count >= 0 (0 skips steering in the audit)"),
    ({"audit_packs": " , "}, "--audit-packs ' , ': use all, or pack names separated by commas"),
])
def test_config_errors_name_the_option(over: dict[str, Any], message: str) -> None:
    with pytest.raises(RunConfigError) as e:
        RunConfig(**over)
    assert message in str(e.value)


def test_cli_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", "run", "--out", str(tmp_path / "r"), "--tokens", "inf"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: --tokens 'inf': use a positive number of tokens such as "
                                                 "500000, 500k or 2M")
    assert not (tmp_path / "r").exists()  # refused before any stage


def test_every_option_reaches_every_stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The wiring alone: each stage function records the options it was called with."""
    from types import SimpleNamespace

    import monoscope.capture
    import monoscope.eval
    import monoscope.features.build
    import monoscope.train

    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}

    def recorder(name: str, result: Any) -> Any:
        def fake(*a: Any, **k: Any) -> Any:
            calls.setdefault(name, []).append((a, k))
            return result
        return fake

    monkeypatch.setattr(monoscope.capture, "capture", recorder("capture", SimpleNamespace(new_tokens=0, seconds=0.0)))
    monkeypatch.setattr(monoscope.train, "train", recorder("train", SimpleNamespace(already_complete=True)))
    monkeypatch.setattr(monoscope.eval, "evaluate", recorder("eval", SimpleNamespace(reused=True)))
    monkeypatch.setattr(monoscope.features.build, "build_features",
                        recorder("features", SimpleNamespace(new_tokens=0, seconds=0.0, dbs=[])))
    import monoscope.search.audit

    monkeypatch.setattr(monoscope.search.audit, "audit", recorder("audit", SimpleNamespace(reused=True)))
    cfg = RunConfig(out=tmp_path / "r", model="m", device="cuda:1", compute_dtype="bf16", batch_contexts=16,
                    contexts_per_shard=32, seed=3, train_batch_size=1024, feature_map=False, explain_features=0,
                    progress=False)
    res = run(cfg, echo=False, command="monoscope run ...")
    assert [s.name for s in res.stages] == list(STAGES) and all(s.reused for s in res.stages)
    (_, cap), = calls["capture"]
    assert (cap["device"], cap["compute_dtype"], cap["batch_contexts"], cap["progress"]) == ("cuda:1", "bf16", 16,
                                                                                              False)
    assert [(a[0], k["width"]) for a, k in calls["train"]] == [(tmp_path / "r" / "sae", "16x"),
                                                              (tmp_path / "r" / "sae-4x", "4x")]
    for _, k in calls["train"]:
        assert (k["device"], k["dtype"], k["seed"], k["batch_size"], k["progress"]) == ("cuda:1", "bfloat16", 3, 1024,
                                                                                        False)
    (_, ev), = calls["eval"]
    assert (ev["device"], ev["compute_dtype"], ev["out"], ev["reuse"]) == ("cuda:1", "bf16", tmp_path / "r" / "eval",
                                                                           True)
    (_, fe), = calls["features"]
    assert (fe["device"], fe["compute_dtype"], fe["batch_contexts"], fe["feature_map"], fe["also"]) == (
        "cuda:1", "bf16", 16, False, [tmp_path / "r" / "sae-4x"])
    (au_args, au), = calls["audit"]
    assert au_args == (tmp_path / "r" / "sae",)
    assert (au["device"], au["compute_dtype"], au["out"], au["packs"], au["steer_top"], au["progress"]) == (
        "cuda:1", "bf16", tmp_path / "r" / "audit", "all", 0, False)
    skipped = run(RunConfig(**{**{f: getattr(cfg, f) for f in config_fields()}, "audit": False}), echo=False)
    assert [s.name for s in skipped.stages] == list(STAGES[:-1]) and skipped.audit is None and len(calls["audit"]) == 1
