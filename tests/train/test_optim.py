"""`--optimizer signum-sf`: the same math as sparsify's `ScheduleFreeWrapper(SignSGD, momentum=0.95)` bit for bit,
its averaged weights are what gets saved, a killed run resumes exactly, and what it does not support is refused."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from monoscope.train import TrainConfig, Trainer, TrainingInterrupted, train
from monoscope.train.config import TrainConfigError
from monoscope.train.optim import SignumScheduleFree
from tests.train.helpers import D, RandomSource, child_env, cli, make_store
from tests.train.test_kill import COMMON, kill_then_resume
from tests.train.test_trainer import BATCH, assert_identical, make_trainer, snapshot

LRS = [1e-2, 1e-2, 2e-2, 2e-2, 5e-3, 5e-3, 1e-2]  # a changing rate exercises lr_max and the weight sum


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(6, 4, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()]


def _loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    a, t = torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)
    w, b = params
    return (torch.relu(a @ w + b) - t).pow(2).sum()


def _train(opt: Any, params: list[torch.Tensor]) -> None:
    for step, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        _loss(params, step).backward()
        opt.step()
        opt.zero_grad()


def test_signum_sf_is_sparsifys_optimizer_bit_for_bit() -> None:
    """Against the installed schedulefree wrapper around sparsify's SignSGD: the training weights y after each
    step and the averaged weights x (the wrapper's eval mode) are equal, bit for bit."""
    sf = pytest.importorskip("schedulefree")
    sign_sgd = pytest.importorskip("sparsify.sign_sgd")
    mine, ref = _params(), _params()
    opt = SignumScheduleFree(mine, lr=LRS[0])
    wrapped = sf.ScheduleFreeWrapper(sign_sgd.SignSGD(ref, lr=LRS[0]), momentum=0.95)
    wrapped.train()
    _train(opt, mine)
    _train(wrapped, ref)
    for a, b in zip(mine, ref, strict=True):
        assert torch.equal(a, b)
    averaged = [x for _, x in opt.averaged()]
    wrapped.eval()
    for a, b in zip(averaged, ref, strict=True):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["k"] == wrapped.param_groups[0]["k"] == len(LRS)
    assert opt.param_groups[0]["weight_sum"] == wrapped.param_groups[0]["weight_sum"]


def test_signum_sf_golden_values() -> None:
    """The same steps without the reference packages: golden sums of y and x (from the run above)."""
    params = _params()
    opt = SignumScheduleFree(params, lr=LRS[0])
    _train(opt, params)
    x = [x for _, x in opt.averaged()]
    got = [float(t.detach().sum()) for t in (*params, *x)]
    assert got == pytest.approx(GOLDEN, abs=1e-6)
    assert opt.param_groups[0]["weight_sum"] == pytest.approx(2 * 1e-4 + 3 * 4e-4 + 2 * 4e-4)  # lr_max² per step


GOLDEN = [3.2561333179473877, -0.8853647112846375, 3.259814977645874, -0.8827283382415771]


def test_default_rate_and_schedule_follow_sparsify() -> None:
    cfg = TrainConfig(arch="topk", tokens=4096, k=32, optimizer="signum-sf")
    assert cfg.learning_rate(576) == pytest.approx(5e-3 / math.sqrt(9216 / 2**14))
    assert cfg.lr_decay_frac == 0.0  # no decay, as sparsify
    assert TrainConfig(arch="topk", tokens=4096, k=32).lr_decay_frac == 0.2
    assert TrainConfig(arch="topk", tokens=4096, k=32, optimizer="signum-sf", lr_decay_frac=0.1).lr_decay_frac == 0.1
    assert cfg.init_decoder_norm == 0.577  # sparsify's encoder row norm, ≈ 1/sqrt(3)
    assert cfg.revive_method == "none"  # no AuxK, as sparsify's auxk_alpha=0
    assert TrainConfig(arch="topk", tokens=4096, k=32, optimizer="signum-sf", revive="auxk").revive_method == "auxk"
    assert TrainConfig(arch="topk", tokens=4096, k=32).init_decoder_norm is None  # the architecture's default
    explicit = TrainConfig(arch="topk", tokens=4096, k=32, optimizer="signum-sf", init_decoder_norm=1.0)
    assert explicit.init_decoder_norm == 1


def test_the_trainer_takes_sparsifys_steps() -> None:
    """Trainer(signum-sf) on a topk SAE against a hand loop with the wrapper: forward, backward, parallel-gradient
    removal, clipping, step, renormalisation of y: the same weights after 12 steps, and the same averaged ones."""
    sf = pytest.importorskip("schedulefree")
    sign_sgd = pytest.importorskip("sparsify.sign_sgd")
    t = make_trainer("topk", steps=12, optimizer="signum-sf", lr=None, revive="none")
    sae = make_trainer("topk", steps=12).sae  # same seed: the same initial SAE
    t.init_b_dec(RandomSource(256, seed=9).data.float())
    sae.b_dec.data.copy_(t.sae.b_dec.data)
    assert t.base_lr == pytest.approx(5e-3 / math.sqrt(4 * D / 2**14))
    wrapped = sf.ScheduleFreeWrapper(sign_sgd.SignSGD(list(sae.parameters()), lr=t.base_lr), momentum=0.95)
    wrapped.train()
    src = RandomSource(BATCH)
    for _ in range(12):
        x = sae.scale(next(src).acts)
        sae(x, sparsity_coef=0.0).total.backward()
        sae.remove_parallel_grads_()
        torch.nn.utils.clip_grad_norm_(list(sae.parameters()), 1.0, foreach=True)
        wrapped.step()
        wrapped.zero_grad()
        sae.normalize_decoder_()
    t.run()
    for k, v in sae.state_dict().items():
        assert torch.equal(t.sae.state_dict()[k], v), k
    wrapped.eval()
    with t.averaged_weights():
        for k, v in sae.state_dict().items():
            assert torch.equal(t.sae.state_dict()[k], v), k
    assert not torch.equal(t.sae.W_dec, sae.W_dec)  # y again after the block


@pytest.mark.parametrize(("arch", "revive"), [("topk", "auxk"), ("batchtopk", "auto")])
def test_resume_and_mid_run_evaluations_are_bit_identical(arch: str, revive: str) -> None:
    """Stopped at step 23 and resumed in a trainer initialised differently, with held-out evaluations on the
    averaged weights at steps 10 and 30 in between: ends as an uninterrupted run without them."""
    ref = make_trainer(arch, optimizer="signum-sf", revive=revive)
    ref.init_b_dec(RandomSource(256, seed=9).data.float())
    ref.run()
    want = snapshot(ref)
    assert "z" in next(iter(ref.optimizer.state.values()))

    first = make_trainer(arch, optimizer="signum-sf", revive=revive)
    first.defer_checks = True  # the GPU's deferred path falls back to the eager step for signum-sf
    first.init_b_dec(RandomSource(256, seed=9).data.float())
    held = RandomSource(BATCH, seed=5).data.float()

    def evaluate(t: Trainer) -> None:
        with t.averaged_weights(), torch.no_grad():
            t.sae.eval()
            t.sae(t.scaled(held))
            t.sae.train()

    def stop(n: int) -> None:
        if first.step == 10:
            evaluate(first)
        if first.step == 23:
            first.stop_signal = 15

    with pytest.raises(TrainingInterrupted, match=r"after step 23 of 60"):
        first.run(on_step=stop)
    ckpt = first.sink.latest()  # type: ignore[union-attr]
    assert ckpt is not None and ckpt.step == 23
    second = make_trainer(arch, seed=1, optimizer="signum-sf", revive=revive)
    second.log.records = [r for r in first.log.records if r["step"] <= 23]  # type: ignore[attr-defined]
    second.load(ckpt)
    second.run(on_step=lambda n: evaluate(second) if second.step == 30 else None)
    assert_identical(snapshot(second), want)
    aux = [r["aux"] for r in ref.log.records]  # type: ignore[attr-defined]
    assert any(a > 0 for a in aux) if revive == "auxk" else all(a == 0 for a in aux)
    assert torch.allclose(second.sae.decoder_norms(), torch.ones(4 * D))  # y's decoder rows are unit norm


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("acts") / "store"
    make_store(folder)
    return folder


def test_monoscope_train_saves_the_averaged_weights_and_resumes_after_sigkill(store: Path, tmp_path: Path) -> None:
    run = {"arch": "batchtopk", "k": 4, "dead_window": 256, "optimizer": "signum-sf"}
    ref = tmp_path / "ref"
    res = train(ref, store=store, **COMMON, **run)
    assert res.config.optimizer == "signum-sf" and res.sae.cfg.init_decoder_norm == 0.577
    last = sorted((ref / "checkpoints").glob("step-*"))[-1]
    y = safetensors.torch.load_file(str(last / "sae.safetensors"))
    z = torch.load(last / "optimizer.pt", weights_only=True)
    names = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n in y]
    saved = safetensors.torch.load_file(str(ref / "sae.safetensors"))
    order = {n: i for i, n in enumerate(dict(res.sae.named_parameters()))}
    for n in names:
        x = torch.lerp(y[n], z["state"][order[n]]["z"], 1 - 1 / 0.95)
        assert torch.equal(saved[n], x), n
    kill_then_resume(store, tmp_path / "sae", run, ref)


@pytest.mark.parametrize(("settings", "message"), [
    ({"arch": "relu-l1"}, "--optimizer signum-sf is only supported for --arch topk, batchtopk or transcoder, not "
                          "relu-l1: use --optimizer adam"),
    ({"arch": "topk", "k": 4, "revive": "resample"},
     "--optimizer signum-sf is not supported with --revive resample: use --revive auxk or none, or --optimizer adam"),
    ({"arch": "topk", "k": 4, "loss": "e2e-kl"},
     "--optimizer signum-sf is not supported with --loss e2e-kl: use --optimizer adam"),
])
def test_unsupported_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(tokens=4096, optimizer="signum-sf", **settings)
    assert str(e.value) == message
    with pytest.raises(TrainConfigError, match=r"^--optimizer 'sgd': use one of adam, signum-sf$"):
        TrainConfig(arch="topk", k=4, tokens=4096, optimizer="sgd")  # type: ignore[arg-type]


def test_the_cli_refuses_with_one_line(store: Path, tmp_path: Path) -> None:
    base = [str(store), "--tokens", "640", "--batch-size", "64", "--width", "4x", "--quiet", "--optimizer",
            "signum-sf"]
    p = subprocess.run(cli(*base, "--out", str(tmp_path / "a"), "--arch", "jumprelu"), env=child_env(),
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: --optimizer signum-sf is only supported for --arch topk, batchtopk or "
                                "transcoder, not jumprelu: use --optimizer adam")
