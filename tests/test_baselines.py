"""The poisoned-data baselines ABL, DBD and ASD: their losses and split rules on hand-built cases,
and each one end to end at the smoke preset through the harness."""
import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgd_defense.defenses.abl import lga_loss
from cgd_defense.defenses.asd import choice_num, class_aware_pool, select_seeds
from cgd_defense.defenses.dbd import _hsv_to_rgb, _rgb_to_hsv, nt_xent, simclr_augment, simclr_pretrain
from cgd_defense.defenses.semisup import (MixMatchConfig, lowest_fraction, mixmatch_epoch, mixmatch_loss, mixup,
                                          sharpen, split_and_mixmatch, symmetric_cross_entropy)
from cgd_defense.harness.pipeline import RunConfig, run
from cgd_defense.registry import create_defense


# ---------------------------------------------------------------------------------------------
# ABL


def _logits_with_loss(ce: float) -> torch.Tensor:
    """Two-class logits [a, 0] whose cross-entropy on label 0 is `ce`: log(1 + e^-a) = ce."""
    return torch.tensor([[-math.log(math.exp(ce) - 1), 0.0]], requires_grad=True)


@pytest.mark.parametrize("ce,sign", [(0.3, -1.0), (0.8, 1.0)])
def test_lga_descends_above_gamma_and_ascends_below(ce, sign):
    logits = _logits_with_loss(ce)
    label = torch.tensor([0])
    value = lga_loss(logits, label, gamma=0.5)
    assert value.item() == pytest.approx(sign * ce, rel=1e-5)
    value.backward()
    reference = _logits_with_loss(ce)
    F.cross_entropy(reference, label).backward()
    assert torch.allclose(logits.grad, sign * reference.grad)  # gradient ascent below gamma


def test_lowest_fraction_picks_the_lowest_and_at_least_one():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.7])
    assert lowest_fraction(scores, 0.4).tolist() == [False, True, False, True, False]
    assert lowest_fraction(scores, 0.01).tolist() == [False, True, False, False, False]


# ---------------------------------------------------------------------------------------------
# DBD / ASD: symmetric cross-entropy, MixMatch


def test_symmetric_cross_entropy_hand_values():
    labels = torch.tensor([3, 3, 3])
    uniform = torch.zeros(1, 10)
    confident_right = torch.full((1, 10), -50.0).index_fill(1, torch.tensor([3]), 50.0)
    confident_wrong = torch.full((1, 10), -50.0).index_fill(1, torch.tensor([7]), 50.0)
    sce = symmetric_cross_entropy(torch.cat([uniform, confident_right, confident_wrong]), labels, alpha=0.1, beta=1.0)
    # uniform: CE = ln 10; RCE = -ln(1e-4) * (9/10 of the mass off the label)
    assert sce[0].item() == pytest.approx(0.1 * math.log(10) - math.log(1e-4) * 0.9, rel=1e-5)
    assert sce[1].item() == pytest.approx(0.0, abs=1e-4)
    # all mass on a wrong class: CE = 100 (the logit gap), RCE saturates at -ln(1e-4)
    assert sce[2].item() == pytest.approx(0.1 * 100 - math.log(1e-4), rel=1e-4)


def test_sharpen_temperature():
    p = torch.tensor([[0.6, 0.4]])
    assert sharpen(p, 0.5).tolist()[0] == pytest.approx([0.36 / 0.52, 0.16 / 0.52])
    assert sharpen(p, 1.0).tolist()[0] == pytest.approx([0.6, 0.4])
    assert sharpen(p, 0.05)[0, 0].item() == pytest.approx(1 / (1 + (2 / 3) ** 20))  # T -> 0: the argmax


def test_mixup_is_a_convex_combination_leaning_to_each_sample():
    eye = torch.eye(6)  # each row a distinct input and one-hot target: mixes are readable off the rows
    mixed_x, mixed_t, lam = mixup(eye, eye.clone(), 0.75, np.random.default_rng(3), torch.Generator().manual_seed(3))
    assert 0.5 <= lam <= 1.0
    assert torch.allclose(mixed_x, mixed_t)
    assert torch.allclose(mixed_x.sum(1), torch.ones(6))
    for i, row in enumerate(mixed_x):
        assert row[i].item() >= lam - 1e-6  # its own sample carries weight lam (plus 1 - lam if paired with itself)
        assert ((row > 0).sum() <= 2) and row.min() >= 0


def test_mixmatch_loss_parts():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    lx, lu = mixmatch_loss(logits, one_hot, logits, logits.softmax(1))
    assert lx.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1])).item(), rel=1e-6)
    assert lu.item() == pytest.approx(0.0, abs=1e-12)
    _, lu_off = mixmatch_loss(logits, one_hot, logits, one_hot)
    assert lu_off.item() == pytest.approx(((logits.softmax(1) - one_hot) ** 2).mean().item())


def test_split_and_mixmatch_rescores_each_epoch_and_trains_on_the_chosen_pool():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40) % 4
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    before = [q.detach().clone() for q in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    cfg = MixMatchConfig(iterations=2, batch_size=8, rampup_epochs=4, crop_padding=1, precision="fp32",
                         channels_last=False)
    seen_losses = []

    def choose_pool(epoch, losses):
        seen_losses.append(losses.clone())
        pool = torch.zeros(40, dtype=torch.bool)
        pool[: 10 + 5 * epoch] = True  # a pool that grows, as ASD's does
        return pool, -losses, {"stage": f"s{epoch}"}

    poisoned = torch.zeros(40, dtype=torch.bool)
    poisoned[5] = True
    trace, pool, score = split_and_mixmatch(
        net, images, labels, optimizer, cfg, epochs=3, choose_pool=choose_pool, sce_alpha=0.1, sce_beta=1.0,
        num_classes=4, seed=0, stage=lambda name: contextlib.nullcontext(),
        report=lambda idx: float(poisoned[idx].float().mean()), first_epoch=2, device="cpu", precision="fp32",
        val=(images[:12], labels[:12]))
    assert [t["stage"] for t in trace] == ["s0", "s1", "s2"] and [t["pool"] for t in trace] == [10, 15, 20]
    # the learning curve: the final model's accuracy on the validation images, after every epoch
    final_val_acc = float((net(images[:12].float() / 255).argmax(1) == labels[:12]).float().mean())
    assert trace[-1]["val_acc"] == pytest.approx(final_val_acc)
    assert all(abs(t["val_acc"] * 12 - round(t["val_acc"] * 12)) < 1e-6 for t in trace)  # a share of 12 images
    assert [t["pool_poison_rate"] for t in trace] == pytest.approx([1 / 10, 1 / 15, 1 / 20])
    assert int(pool.sum()) == 20 and torch.equal(score, -seen_losses[-1])
    assert not torch.allclose(seen_losses[0], seen_losses[1])  # scored again under the updated model
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert trace[0]["lambda_u"] == pytest.approx(15.0 * 3 / 4)  # the ramp counts from first_epoch


# ---------------------------------------------------------------------------------------------
# DBD: SimCLR pieces


def test_nt_xent_hand_value_and_ordering():
    z = torch.eye(4)  # 4 images, both views identical and orthogonal to the others
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 6 * math.exp(0.0)))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-5)
    swapped = z[[1, 0, 3, 2]]  # each view's partner is another image's view
    assert nt_xent(z, swapped, t).item() > expected + 1


def test_hsv_round_trip_and_hue_shift():
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_hsv_to_rgb(*_rgb_to_hsv(x)), x, atol=1e-5)
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1.0
    h, s, v = _rgb_to_hsv(red)
    green = _hsv_to_rgb((h + 1 / 3) % 1.0, s, v)
    assert green.flatten().tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-5)


def test_simclr_views_differ_and_stay_images():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    v1, v2 = simclr_augment(x, g), simclr_augment(x, g)
    assert v1.shape == x.shape and v1.min() >= 0 and v1.max() <= 1
    assert not torch.allclose(v1, v2)


@pytest.mark.parametrize("loop", ["simclr", "mixmatch"])
def test_fresh_whitened_fastnet_gets_its_stem_from_data_in_the_defense_loops(loop):
    """DBD's SimCLR and DBD/ASD's MixMatch train fresh models outside `train`: they must run the
    whitening stem's data initialisation first, or they train on a random frozen stem that the
    next `train` call (DBD's head warm-up) would then replace under the trained layers."""
    from cgd_defense.harness.pipeline import build_model
    from cgd_defense.harness.presets import get_preset
    from cgd_defense.harness.trainer import TrainConfig, train

    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 2
    net = build_model(get_preset("cpu"), "cifar10", 2)  # fastnet_whitened
    random_stem = net.net.whiten.weight.detach().clone()
    if loop == "simclr":
        simclr_pretrain(net, images, epochs=1, cosine_epochs=10, batch_size=8, lr=0.1, momentum=0.9,
                        weight_decay=0.0, temperature=0.5, seed=0, device="cpu", precision="fp32",
                        channels_last=False)
    else:
        cfg = MixMatchConfig(iterations=1, batch_size=4, rampup_epochs=1, precision="fp32", channels_last=False)
        mixmatch_epoch(net, images, labels, torch.arange(8), torch.arange(8, 16), torch.optim.Adam(net.parameters()),
                       cfg, epoch=0, num_classes=2, generator=torch.Generator().manual_seed(0),
                       rng=np.random.default_rng(0), device="cpu")
    assert not net.needs_data_init and not torch.equal(net.net.whiten.weight, random_stem)
    stem = net.net.whiten.weight.detach().clone()
    train(net, images, labels, TrainConfig(epochs=1, batch_size=8, precision="fp32", channels_last=False),
          device="cpu")
    assert torch.equal(net.net.whiten.weight, stem)  # a later `train` leaves the stem alone


# ---------------------------------------------------------------------------------------------
# ASD: split rules


def test_asd_pool_growth_follows_the_authors_schedule():
    assert [choice_num(e, 5, 10) for e in (0, 4, 5, 9, 10, 59)] == [0, 0, 10, 10, 20, 110]


def test_asd_class_aware_pool_seeds_plus_lowest_per_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    losses = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.8, 0.05, 0.6])
    seeds = torch.tensor([0, 5])  # seeds stay in whatever their loss
    pool = class_aware_pool(losses, labels, seeds, per_class=1, num_classes=2)
    assert torch.nonzero(pool).flatten().tolist() == [0, 1, 5, 6]
    pool = class_aware_pool(losses, labels, seeds, per_class=2, num_classes=2)
    assert torch.nonzero(pool).flatten().tolist() == [0, 1, 3, 4, 5, 6]
    assert class_aware_pool(losses, labels, seeds, per_class=0, num_classes=2).sum() == 2


def test_asd_meta_split_keeps_samples_whose_loss_drops_least():
    loss = torch.tensor([2.0, 2.0, 1.0, 1.0])
    meta_loss = torch.tensor([0.1, 1.9, 0.2, 0.9])  # samples 0 and 2 are learned fast: suspicious
    assert lowest_fraction(loss - meta_loss, 0.5).tolist() == [False, True, False, True]


def test_asd_seeds_per_class_from_the_oracle_pool():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    seeds, shortfall = select_seeds(torch.tensor([0, 1, 2, 3, 6, 7]), labels, 2, 3, seed=0)
    assert sorted(labels[seeds].tolist()) == [0, 0, 1, 1, 2, 2] and set(seeds.tolist()) <= {0, 1, 2, 3, 6, 7}
    assert shortfall == {}
    # class 2 has no oracle sample (as SIG's target class): filled from its other samples, and said so
    seeds, shortfall = select_seeds(torch.tensor([0, 1, 2, 3]), labels, 2, 3, seed=0)
    assert sorted(labels[seeds].tolist()) == [0, 0, 1, 1, 2, 2] and shortfall == {2: 2}
    assert set(seeds[labels[seeds] == 2].tolist()) == {6, 7}


# ---------------------------------------------------------------------------------------------
# End to end at the smoke preset


@pytest.fixture(scope="module")
def smoke_run(mini_root, session_cache_dir):
    """`smoke_run(name)`: the baseline's result on BadNets at the smoke preset, run once per module."""
    results = {}

    def get(name: str) -> dict:
        if name not in results:
            results[name] = run(RunConfig(attack="badnets", defense=name, preset="smoke", data_root=str(mini_root),
                                          cache_dir=str(session_cache_dir)))
        return results[name]
    return get


@pytest.mark.parametrize("name", ["abl", "dbd", "asd"])
def test_baseline_runs_end_to_end_and_reports_its_split(smoke_run, name):
    result = smoke_run(name)
    n_train = result["data"]["n_train"]
    split = result["split"]
    assert split["n_total"] == n_train and split["n_clean_part"] + split["n_suspect_part"] == n_train
    assert 0 <= split["suspect_tpr"] <= 1 and 0 <= split["clean_part_poison_rate"] <= 1
    expected_stages = {"abl": {"isolation", "finetune", "unlearning"}, "dbd": {"simclr", "linear_warmup", "split",
                       "mixmatch"}, "asd": {"seeds", "split", "mixmatch"}}[name]
    assert {f"defense.{s}" for s in expected_stages} <= set(result["stage_times"])
    # the work it declares per stage (bench/defense_cost.py's projections) covers exactly the stages it times
    defense = create_defense(name, preset="smoke")
    assert set(defense.stage_work(n_train)) == {k.removeprefix("defense.") for k in result["stage_times"]
                                                if k.startswith("defense.")}
    # a fresh model trained on the poisoned set: its predictions are not the backdoored model's
    assert (result["clean_acc"], result["asr"]) != (result["no_defense"]["clean_acc"], result["no_defense"]["asr"])


def test_abl_isolates_one_percent(smoke_run):
    result = smoke_run("abl")
    assert result["split"]["n_suspect_part"] == max(1, int(0.01 * result["data"]["n_train"]))


def test_asd_seeds_are_clean_and_recorded(smoke_run):
    result = smoke_run("asd")
    info = result["defense_info"]
    assert info["n_seeds"] == 10 * 10 and info["seed_poison_rate"] == 0.0
    assert [e["stage"] for e in info["epochs"]] == ["class-aware", "class-agnostic", "meta"]
    assert info["epochs"][0]["pool"] == 100  # stage 1 starts from the seeds alone
    assert all(0.0 <= e["val_acc"] <= 1.0 for e in info["epochs"])  # the learning curve on the validation split


def test_dbd_keeps_the_lowest_loss_half_labelled(smoke_run):
    result = smoke_run("dbd")
    assert result["split"]["n_clean_part"] == int(0.5 * result["data"]["n_train"])
    assert len(result["defense_info"]["mixmatch_epochs"]) == 2 and len(result["defense_info"]["simclr_loss"]) == 1
    assert all(0.0 <= e["val_acc"] <= 1.0 for e in result["defense_info"]["mixmatch_epochs"])


def test_dbd_ramp_up_counts_the_warm_up_only_when_asked(smoke_run, mini_root, session_cache_dir):
    """smoke: warm-up 0.5 epoch (one counted epoch), ramp-up 2 epochs, lambda_u 15, 2 MixMatch epochs;
    the trace holds lambda_u at the end of each epoch."""
    result = smoke_run("dbd")
    counted = [e["lambda_u"] for e in result["defense_info"]["mixmatch_epochs"]]
    assert counted == pytest.approx([15.0, 15.0])  # the authors' way: (1 + 1) / 2 already at the first epoch's end
    cfg = RunConfig(attack="badnets", defense="dbd", preset="smoke", data_root=str(mini_root),
                    cache_dir=str(session_cache_dir), defense_params={"rampup_counts_warmup": False})
    uncounted = [e["lambda_u"] for e in run(cfg)["defense_info"]["mixmatch_epochs"]]
    assert uncounted == pytest.approx([7.5, 15.0])  # the ramp starts with MixMatch: 1/2, then 2/2
