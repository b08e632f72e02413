"""BitStack with calibration: GPTQ sign choice and factor refit in the input-Hessian metric,
and the pass options that turn them on (the format and the importance order are unchanged)."""

from __future__ import annotations

import copy

import pytest
import torch

from edgestack.compress import compress
from edgestack.compress.bitstack import check_order, decompose, set_tier, top_singular
from edgestack.compress.bitstack_fit import gptq_signs, inverse_factor, refit_factors
from edgestack.compress.gptq import h_error, hessian
from edgestack.compress.layers import BitStackWeight
from edgestack.errors import CompressError

from mlp_cases import MLP, mlp_calib, out_err


def correlated_layer(m: int = 48, n: int = 64, tokens: int = 2000, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight ``[m, n]`` and the damped Hessian of correlated, uneven inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    x = (torch.randn(tokens, n, generator=g) @ mix) * torch.linspace(0.2, 3.0, n)
    return w, hessian(x.double().t() @ x.double(), tokens)


def magnitude(r: torch.Tensor, k: int) -> torch.Tensor:
    uu, s, vh = top_singular(r.abs(), k, "exact")
    return (uu * s) @ vh


def test_gptq_signs_lower_the_output_error_of_a_block():
    w, h = correlated_layer()
    mag = magnitude(w, 2)
    plain = torch.where(w >= 0, 1.0, -1.0)
    signs = gptq_signs(w, mag, inverse_factor(h))
    assert signs.shape == w.shape and set(signs.unique().tolist()) <= {-1.0, 1.0}
    e_plain, e_gptq = h_error(w - plain * mag, h), h_error(w - signs * mag, h)
    assert e_gptq < 0.85 * e_plain, (e_plain, e_gptq)
    # with H = I there is nothing to spread onto: GPTQ picks the entrywise best signs
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    best = torch.where(w * mag >= 0, 1.0, -1.0)
    assert torch.equal(gptq_signs(w, mag, inverse_factor(eye)), best)


def test_refit_lowers_the_output_error_and_keeps_the_shapes():
    w, h = correlated_layer(seed=1)
    uu, s, vh = top_singular(w.abs(), 3, "exact")
    u, v = uu * s.sqrt(), s.sqrt()[:, None] * vh
    signs = gptq_signs(w, u @ v, inverse_factor(h))
    before = h_error(w - signs * (u @ v), h)
    u2, v2 = refit_factors(w, signs, u, v, h, iters=2)
    assert u2.shape == u.shape and v2.shape == v.shape
    after = h_error(w - signs * (u2 @ v2), h)
    assert after < 0.95 * before, (before, after)
    # balanced factors: u's column norms equal v's row norms
    assert torch.allclose(torch.linalg.norm(u2, dim=0), torch.linalg.norm(v2, dim=1),
                          rtol=1e-4)


def test_decompose_with_hessian_beats_plain_and_stays_a_prefix_code():
    w, h = correlated_layer(seed=2)
    scale = torch.diagonal(h).sqrt().float()
    scale = scale / scale.mean()
    werr_plain: list[float] = []
    decompose(w, 4, 2, scale, svd="exact", weighted_errors=werr_plain, h=h, signs="plain")
    werr: list[float] = []
    stack, errors = decompose(w, 4, 2, scale, svd="exact", weighted_errors=werr, h=h,
                              signs="gptq", refit=1)
    assert all(b < a for a, b in zip(werr, werr[1:], strict=False)), werr
    # the first blocks gain most (on a random Gaussian layer, blocks 3+ gain little or
    # nothing; on MiniLM every block gained: see docs/quality.md)
    assert werr[0] < 0.9 * werr_plain[0] and werr[1] < 0.95 * werr_plain[1], \
        (werr, werr_plain)
    # the stored (fp16) stack decodes to exactly what the errors were measured on
    norm = h_error(w, h)
    for b in range(1, 5):
        d = w - torch.from_numpy(stack.decode(b))
        assert (h_error(d, h) / norm) ** 0.5 == pytest.approx(werr[b - 1], rel=1e-4)
        assert float(d.norm() / w.norm()) == pytest.approx(errors[b - 1], rel=1e-4)


def test_pass_uses_gptq_signs_with_calibration_and_beats_plain():
    ref, data = MLP(), mlp_calib()
    plain, fitted = copy.deepcopy(ref), copy.deepcopy(ref)
    rp = compress(plain, "bitstack", n_blocks=3, calib=data, signs="plain", refit=0)
    rf = compress(fitted, "bitstack", n_blocks=3, calib=data, signs="gptq")
    assert {r.details["signs"] for r in rf.layers} == {"gptq"}
    assert {r.details["refit"] for r in rf.layers} == {0}
    assert {r.details["signs"] for r in rp.layers} == {"plain"}
    assert rf.compressed_bytes == rp.compressed_bytes
    check_order(rf.importance_order, {r.name: 3 for r in rf.layers})
    # GPTQ wins clearly on the first block; on these tiny layers (k=1) it loses from the
    # third block on, which is what signs="auto" guards against
    set_tier(plain, rp, levels=1)
    set_tier(fitted, rf, levels=1)
    assert out_err(fitted, ref, data) < 0.9 * out_err(plain, ref, data)
    auto = compress(copy.deepcopy(ref), "bitstack", n_blocks=3, calib=data)
    def summed_error(rep, name):  # sum over blocks of the relative output error
        gains = rep.layer(name).details["gains"]
        return sum(max(0.0, 1 - sum(gains[:b + 1])) ** 0.5 for b in range(len(gains)))

    # (rp measured its gains in the diagonal metric: only GPTQ's are comparable here)
    for name in ("fc1", "fc2"):
        assert summed_error(auto, name) <= summed_error(rf, name) * (1 + 1e-6)
        if auto.layer(name).details["signs"] == "gptq":
            assert summed_error(auto, name) == pytest.approx(summed_error(rf, name), rel=1e-6)
        else:
            assert auto.layer(name).details["signs"] == "plain"
            assert summed_error(auto, name) < summed_error(rf, name)
    assert isinstance(fitted.fc2.weight_module, BitStackWeight)
    # without calibration the default falls back to plain signs
    nocal = compress(copy.deepcopy(ref), "bitstack", n_blocks=2)
    assert {r.details["signs"] for r in nocal.layers} == {"plain"}


def test_gptq_signs_need_calibration_and_options_are_checked():
    with pytest.raises(CompressError, match=r"signs='gptq' need\(s\) calibration data"):
        compress(MLP(), "bitstack", signs="gptq")
    with pytest.raises(CompressError, match=r"finetune_steps need\(s\) calibration data"):
        compress(MLP(), "bitstack", finetune_steps=3)
    with pytest.raises(CompressError, match="option signs: expected one of"):
        compress(MLP(), "bitstack", signs="best")
    with pytest.raises(CompressError, match="option refit: expected an integer 0..20"):
        compress(MLP(), "bitstack", refit=-1)


def test_finetune_lowers_the_output_error_of_every_tier_and_keeps_the_format():
    ref, data = MLP(), mlp_calib()
    base, tuned = copy.deepcopy(ref), copy.deepcopy(ref)
    rb = compress(base, "bitstack", n_blocks=3, calib=data, signs="gptq")
    rt = compress(tuned, "bitstack", n_blocks=3, calib=data, signs="gptq", finetune_steps=60,
                  finetune_lr=3e-3, seed=1)
    info = rt.details["finetune"]
    # (single-step losses are on random tiers and batches: compared below per tier instead)
    assert info["steps"] == 60 and info["loss_last"] > 0
    assert rt.importance_order == rb.importance_order
    assert rt.compressed_bytes == rb.compressed_bytes
    for levels in (2, 3):
        set_tier(base, rb, levels=levels)
        set_tier(tuned, rt, levels=levels)
        assert out_err(tuned, ref, data) < out_err(base, ref, data), levels
    for name in ("fc1", "fc2"):
        wb, wt = base.get_submodule(name).weight_module, tuned.get_submodule(name).weight_module
        assert isinstance(wt, BitStackWeight) and wt.u.dtype == torch.float16
        assert torch.equal(wb.signs, wt.signs) and not torch.equal(wb.u, wt.u)
        # rel_error is re-measured on the fine-tuned stack
        w = ref.get_submodule(name).weight.detach()
        got = float((torch.from_numpy(wt.to_format().decode()) - w).norm() / w.norm())
        assert rt.layer(name).details["rel_error"][-1] == pytest.approx(got, rel=1e-4)
        assert rt.layer(name).details["finetuned"] is True
