from __future__ import annotations

import torch

from monoscope.sae import SAEConfig, build_sae
from monoscope.train.dead import DeadFeatureTracker, resample_dead


def test_dead_means_not_fired_for_a_window_of_tokens() -> None:
    t = DeadFeatureTracker(4, window=100)
    fired = torch.tensor([True, False, False, False])
    t.update(fired, 60)
    assert t.dead().tolist() == [False, False, False, False]  # nothing is dead before a full window
    t.update(torch.tensor([False, True, False, False]), 40)
    assert t.dead().tolist() == [False, False, True, True]
    assert t.dead_fraction() == 0.5
    t.reset(torch.tensor([2]))
    assert t.dead().tolist() == [False, False, False, True]
    u = DeadFeatureTracker(4, window=1)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.since, t.since) and u.window == 100


def test_resampling_points_dead_features_at_badly_reconstructed_inputs() -> None:
    d, n_feat = 8, 16
    sae = build_sae(SAEConfig(arch="relu-l1", d_in=d, d_sae=n_feat), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(64, d)
    sae(x, sparsity_coef=1.0).total.backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: opt.state[p]["exp_avg"].clone() for n, p in sae.named_parameters()}
    x_hat = x.clone()
    x_hat[5] = 0.0  # row 5 is the only badly reconstructed input
    dead = torch.zeros(n_feat, dtype=torch.bool)
    dead[[3, 7]] = True
    idx = resample_dead(sae, opt, dead, x, x_hat, torch.Generator().manual_seed(0))
    assert idx.tolist() == [3, 7]
    v = x[5] - before["b_dec"]
    v = v / v.norm()
    alive = ~dead
    dec_norm = before["W_dec"][alive].norm(dim=1).mean()
    enc_norm = before["W_enc"][alive].norm(dim=1).mean()
    for i in (3, 7):
        torch.testing.assert_close(sae.W_dec[i], v * dec_norm)
        torch.testing.assert_close(sae.W_enc[i], v * 0.2 * enc_norm)
        assert float(sae.b_enc[i].detach()) == 0.0
    for name, p in sae.named_parameters():
        st = opt.state[p]
        if name in ("W_dec", "W_enc", "b_enc"):
            assert torch.equal(p[alive], before[name][alive])  # live features untouched
            assert bool((st["exp_avg"][dead] == 0).all()) and bool((st["exp_avg_sq"][dead] == 0).all())
            assert torch.equal(st["exp_avg"][alive], moments[name][alive])
        else:
            assert torch.equal(p, before[name])
    assert resample_dead(sae, opt, torch.zeros(n_feat, dtype=torch.bool), x, x_hat,
                         torch.Generator()).numel() == 0
