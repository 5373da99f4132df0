"""The diagnostics against independent slow computations on tiny float64 models."""
import json
import math

import pytest
import torch

import mambamerge
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.cli.main import main
from mambamerge.diagnostics.attention import apply_attention, class_token_attention, implicit_attention
from mambamerge.diagnostics.decay import decay_factors, effective_lengths
from mambamerge.diagnostics.dependence import order_effect, perturbation_curve, token_orders
from mambamerge.diagnostics.groups import merge_steps
from mambamerge.diagnostics.importance import average_ranks, candidate_statistics, leave_one_out, spearman
from mambamerge.diagnostics.probe import block_scans, mixer_input, scan_inputs, trace
from mambamerge.diagnostics.prune_vs_merge import PruneInstead, prune_vs_merge
from mambamerge.merge import MaMe
from mambamerge.merge.state import TokenState
from mambamerge.models.blocks import Block
from mambamerge.ops import selective_scan_reference
from conftest import perturb_

DEMO = demo_checkpoint()  # the shipped vim_nano trained on Fashion-MNIST


@pytest.fixture
def pico64():
    torch.manual_seed(0)
    return perturb_(mambamerge.create_model("vim_pico", depth=3)).double().eval()


def images(model, batch=2, seed=1):
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, *cfg.img_size, generator=gen, dtype=torch.float64)


def test_scan_inputs_are_the_mixers_own(pico64):
    x = images(pico64)
    tokens = pico64.embed(x)
    block = pico64.layers[0]
    hidden, _, ssm = block(tokens, None, return_ssm=True)
    x = mixer_input(block, tokens, None)
    scans = scan_inputs(block.mixer, x)
    torch.testing.assert_close(scans["fwd"].delta.transpose(1, 2), ssm.delta_fwd, rtol=0, atol=1e-12)
    torch.testing.assert_close(scans["bwd"].B.transpose(1, 2), ssm.B_bwd, rtol=0, atol=1e-12)
    assert not scans["fwd"].reverse and scans["bwd"].reverse
    torch.testing.assert_close(block.mixer(x, scan=lambda s: selective_scan_reference(*s)), hidden, rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_implicit_attention_reproduces_the_scan_exactly(pico64, direction):
    tr = trace(pico64, images(pico64))
    scan = block_scans(pico64, tr, 1)[direction]
    alpha = implicit_attention(scan)
    length = scan.u.shape[1]
    assert alpha.shape == (2, pico64.layers[1].mixer.d_inner, length, length)
    torch.testing.assert_close(apply_attention(alpha, scan), selective_scan_reference(*scan[:6], reverse=scan.reverse),
                               rtol=1e-12, atol=1e-12)
    # one-way: the forward scan never sees later tokens, the backward one never earlier ones
    hidden_side = alpha.triu(1) if direction == "fwd" else alpha.tril(-1)
    assert hidden_side.abs().max() == 0 and alpha.abs().max() > 0
    assert class_token_attention(alpha, pico64.cls_index).shape == (2, length)


def test_attention_of_both_directions_gives_the_blocks_output(pico64):
    tr = trace(pico64, images(pico64))
    block = pico64.layers[2]
    out = block.mixer(mixer_input(block, tr.hidden[2], tr.residual[2]),
                      scan=lambda s: apply_attention(implicit_attention(s), s))
    torch.testing.assert_close(out, tr.hidden[3], rtol=1e-10, atol=1e-12)


def test_decay_factors_match_a_loop(pico64):
    scan = block_scans(pico64, trace(pico64, images(pico64)), 0)["bwd"]
    factors = decay_factors(scan, 3)
    delta = scan.delta  # (B, L, d); the backward scan runs from the last token to the first
    length = delta.shape[1]
    for k in (0, 2, 3):
        terms = [torch.exp(delta[:, t - k:t].sum(1)[..., None] * scan.A) for t in range(k, length)]
        torch.testing.assert_close(factors[k], torch.stack(terms).mean(dim=(0, 1)), rtol=1e-12, atol=1e-12)
    lengths = effective_lengths(torch.tensor([[1.0, 1.0], [0.5, 0.2], [0.3, 0.1]])[:, :, None])
    assert lengths[:, 0].tolist() == [2.0, 1.0]
    assert math.isinf(effective_lengths(torch.ones(3, 1, 1))[0, 0])


def test_spearman_with_ties_matches_the_textbook_formula():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    y = torch.tensor([[2.0, 1.0, 4.0, 3.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]])
    rho = spearman(x, y)
    assert rho[0].item() == pytest.approx(1 - 6 * 4 / (5 * 24))  # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
    assert rho[1].item() == pytest.approx(-rho[0].item())


def test_leave_one_out_equals_a_brute_force_loop(pico64):
    x, labels = images(pico64, batch=2), torch.tensor([3, 7])
    cls = pico64.cls_index
    for block in (0, 2):
        effects = leave_one_out(pico64, x, labels, block, chunk=5)
        dense = pico64(x)
        hidden, residual = pico64.embed(x), None
        for layer in pico64.layers[:block]:
            hidden, residual = layer(hidden, residual)
        for t in range(hidden.shape[1]):
            if t == cls:
                assert torch.isnan(effects.kl[:, t]).all()
                continue
            keep = [i for i in range(hidden.shape[1]) if i != t]
            h, r = hidden[:, keep], None if residual is None else residual[:, keep]
            for layer in pico64.layers[block:]:
                h, r = layer(h, r)
            logits = pico64.head(pico64.final_norm(h, r)[:, cls - (t < cls)])
            p, q = dense.softmax(-1), logits.softmax(-1)
            torch.testing.assert_close(effects.kl[:, t], (p * (p.log() - q.log())).sum(-1), rtol=1e-9, atol=1e-14)
            drop = dense[torch.arange(2), labels] - logits[torch.arange(2), labels]
            torch.testing.assert_close(effects.logit_drop[:, t], drop, rtol=1e-9, atol=1e-12)
    assert effects.kl[:, [0, -1]].min() > 0


def test_candidate_statistics_name_every_form(pico64):
    tr = trace(pico64, images(pico64))
    stats = candidate_statistics(pico64, tr, 1)
    for name in ("delta:mean:sum:this", "raw:max:bwd:next", "delta_z:l2:fwd:this", "write:sum:sum:next",
                 "cls_proximity", "stream_norm"):
        assert stats[name].shape == (2, tr.hidden[1].shape[1])
    scans = block_scans(pico64, tr, 0)
    torch.testing.assert_close(stats["delta:mean:sum:this"], scans["fwd"].delta.mean(-1) + scans["bwd"].delta.mean(-1))
    torch.testing.assert_close(stats["raw:max:fwd:this"], torch.log(torch.expm1(scans["fwd"].delta)).amax(-1))
    with pytest.raises(ValueError, match="before blocks 1..2"):
        candidate_statistics(pico64, tr, 0)


def test_pruning_instead_drops_exactly_the_tokens_the_method_merges(pico64):
    tokens = pico64.embed(images(pico64))
    hidden, residual, ssm = pico64.layers[0](tokens, None, return_ssm=True)
    state = TokenState.start(tokens, pico64.layout).with_streams(hidden, residual)
    merged = MaMe().plan(state, ssm, 5)
    pruned = PruneInstead(MaMe()).plan(state, ssm, 5)
    assert torch.equal(pruned.rep, merged.rep)
    assert (pruned.assign.gather(1, merged.movers) == -1).all() and pruned.movers.numel() == 0
    new = state.apply(pruned)  # survivors untouched, bit for bit
    torch.testing.assert_close(new.hidden, (hidden + residual).gather(1, merged.rep[..., None].expand(-1, -1, 32)),
                               rtol=0, atol=0)


def test_prune_vs_merge_differs_only_where_tokens_merge(pico64):
    x, labels = images(pico64, batch=6), torch.arange(6)
    configs = {"random": {"method": "random"}, "mame": {"method": "mame"}}
    result = prune_vs_merge(pico64, x, labels, configs, [0.4], batch=4)
    rows = {row["config"]: row for row in result["rows"]}
    assert rows["random"]["merge"] == rows["random"]["prune"]  # random pruning merges nothing
    assert rows["mame"]["merge"]["kl"] != rows["mame"]["prune"]["kl"]
    assert pico64.token_reducer is None


def test_merge_steps_partition_the_patches(pico64):
    x = images(pico64, batch=2)
    steps = merge_steps(pico64, x, "mame", 0.5)
    patches = pico64.cfg.num_patches
    assert [s["tokens"] for s in steps] == mambamerge.patch(pico64, "mame", 0.5).token_reducer.schedule.token_counts(
        patches + 1)[1:len(steps) + 1]
    mambamerge.unpatch(pico64)
    for step in steps:
        groups = step["groups"]
        assert groups.shape == (2, patches) and (groups >= 0).all()
        for b in range(2):  # one group per non-class token, each named by its smallest patch
            ids = groups[b].unique()
            assert len(ids) == step["tokens"] - 1
            assert all(int((groups[b] == i).nonzero()[0]) == int(i) for i in ids)
    pruned = merge_steps(pico64, x, "random", 0.5)
    assert (pruned[-1]["groups"] == -1).sum(1).tolist() == [patches + 1 - pruned[-1]["tokens"]] * 2


def test_reordering_and_nudging(pico64):
    x, labels = images(pico64, batch=3), torch.tensor([0, 1, 2])
    effect = order_effect(pico64, x, labels, block=1, orders=("identity", "reverse", "even_odd"))
    assert effect["identity"]["agreement"] == 1.0 and abs(effect["identity"]["kl"]) < 1e-12
    assert effect["even_odd"]["kl"] > 0
    orders = token_orders(17, 8)
    for name, perm in orders.items():
        assert sorted(perm.tolist()) == list(range(17)), name
    assert orders["random"][8] == 8 and orders["local"][8] == 8
    curve = perturbation_curve(pico64, x[:2], block=1, scope="block")
    assert curve["distance"].tolist() == [t - 8 for t in range(17) if t != 8]
    assert curve["change"].shape == (2, 16) and (curve["change"] > 0).all()
    still = perturbation_curve(pico64, x[:1], block=0, scope="model", eps=0.0)
    assert still["change"].abs().max() == 0


@pytest.mark.parametrize("variant", ["bi", "bi_shared", "forward"])
def test_implicit_attention_gives_every_mixer_variants_output(variant):
    torch.manual_seed(0)
    block = perturb_(Block(16, d_state=4, variant=variant, divide_out=variant == "bi")).double()
    tokens = torch.randn(2, 9, 16, dtype=torch.float64)
    hidden, _ = block(tokens, None)
    out = block.mixer(mixer_input(block, tokens, None), scan=lambda s: apply_attention(implicit_attention(s), s))
    torch.testing.assert_close(out, hidden, rtol=1e-10, atol=1e-12)
    scans = scan_inputs(block.mixer, mixer_input(block, tokens, None))
    assert (scans["fwd"] is scans["bwd"]) == (variant == "forward")


def test_diagnose_and_visualize_commands(tmp_path, capsys):
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model("vim_pico", in_chans=1, depth=3))
    path = mambamerge.save_checkpoint(model, tmp_path / "pico.safetensors")
    common = ["--checkpoint", str(path), "--data", "fashion-mnist", "--split", "test", "--threads", "1"]
    assert main(["diagnose", *common, "--images", "8", "--parts", "decay", "order", "prune_vs_merge",
                 "--reductions", "0.3", "--out", str(tmp_path / "d")]) == 0
    numbers = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert set(numbers["order"]) == {"0", "1"} and len(numbers["decay"]["blocks"]) == 3
    assert (tmp_path / "d" / "decay.png").read_bytes()[:4] == b"\x89PNG"
    assert "prune vs merge (8 images" in (tmp_path / "d" / "summary.txt").read_text()
    assert main(["visualize", *common, "--images", "2", "--reduction", "0.4", "--out", str(tmp_path / "v")]) == 0
    assert (tmp_path / "v" / "merge_mame.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["diagnose", *common, "--loo-blocks", "0", "--out", str(tmp_path / "e")]) == 2
    assert "leave-one-out blocks must be in [1, 2]" in capsys.readouterr().err
    assert not (tmp_path / "e" / "diagnostics.json").exists()


def test_diagnose_and_visualize_defaults_run_on_the_shipped_split(tmp_path, capsys):
    common = ["--checkpoint", str(DEMO), "--data", "fashion-mnist", "--threads", "1", "--images", "4"]
    assert main(["visualize", *common, "--out", str(tmp_path / "v")]) == 0
    assert "fashion-mnist test, 4 inputs from #0 (stratified" in capsys.readouterr().out
    assert json.loads((tmp_path / "v" / "merge_mame.json").read_text())["reduction"] == 0.5
    assert main(["diagnose", *common, "--parts", "order", "prune_vs_merge", "--out", str(tmp_path / "d")]) == 0
    summary = (tmp_path / "d" / "summary.txt").read_text()
    assert "fashion-mnist test" in summary and all(f"{r:.0%}" in summary for r in (0.2, 0.4, 0.6))


def test_unreachable_reductions_are_refused_before_any_work_and_leave_no_folder(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    path = mambamerge.save_checkpoint(mambamerge.create_model("vim_pico", in_chans=1), tmp_path / "pico.safetensors")

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the settings were checked")

    monkeypatch.setattr("mambamerge.data.load_dataset", no_data)
    common = ["--checkpoint", str(path), "--data", "fashion-mnist", "--threads", "1"]
    for command, flag in (("visualize", "--reduction 0.5"), ("diagnose", "--reductions 0.")):
        assert main([command, *common, "--out", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err
        assert flag in err and "2-block model" in err and f"lower {flag.split()[0]}" in err, err
        assert not (tmp_path / command).exists()
    assert main(["diagnose", *common, "--loo-blocks", "5", "--out", str(tmp_path / "e")]) == 2
    assert "leave-one-out blocks must be in [1, 1]" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_a_missing_train_split_suggests_the_shipped_one(tmp_path, capsys, monkeypatch):
    import mambamerge.data.datasets as datasets

    shipped = [d for d in datasets._candidates("fashion-mnist") if "assets" in str(d)]
    monkeypatch.setattr(datasets, "_candidates", lambda name: shipped)  # as on a machine without the Debian package
    argv = ["visualize", "--checkpoint", str(DEMO), "--data", "fashion-mnist", "--split", "train", "--threads", "1",
            "--out", str(tmp_path / "v")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no fashion-mnist train split" in err and "--split test" in err and not (tmp_path / "v").exists()
