"""The clean-data defenses (FP, NAD, ANP, I-BAU) and where their clean data comes from."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from cgd_defense.data import ImageData
from cgd_defense.defenses.anp import NeuronPerturbation, neurons_to_prune, optimise_neuron_masks, prune_neurons
from cgd_defense.defenses.base import DefenseContext, Split
from cgd_defense.defenses.clean_source import CleanDataParams, reference_size, resolve_clean_data
from cgd_defense.defenses.fp import FinePruning, choose_pruned_channels, last_stage_statistics
from cgd_defense.defenses.ibau import FIXED_POINT_STEP, PERTURBATION_L2, implicit_hypergradient
from cgd_defense.defenses.nad import attention_map
from cgd_defense.errors import CGDError, ConfigError
from cgd_defense.harness.cache import tensor_digest
from cgd_defense.harness.pipeline import RunConfig, run
from cgd_defense.harness.presets import get_preset
from cgd_defense.harness.trainer import TrainConfig
from cgd_defense.models import Classifier
from cgd_defense.registry import create_defense

# ---------------------------------------------------------------------------------------------- clean sources

def _poisoned_context(n: int = 200, seed: int = 0):
    """A training set whose first 20 samples are 'poisoned', and a context holding that ground truth."""
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 4,
                     list("abcd"))
    poison = torch.zeros(n, dtype=torch.bool)
    poison[:20] = True
    ctx = DefenseContext(dataset="toy", classes=data.classes, preset=get_preset("smoke"), cache=None, seed=seed)

    def oracle(fraction):
        clean_idx = torch.nonzero(~poison).flatten()
        chosen = clean_idx[torch.randperm(len(clean_idx), generator=torch.Generator().manual_seed(1))]
        chosen = torch.sort(chosen[:int(round(fraction * n))]).values
        return chosen, data.subset(chosen)

    ctx.oracle_clean_subset = oracle
    ctx.report_poison_rate = lambda idx: float(poison[idx].float().mean())
    return data, poison, ctx


def test_oracle_and_random_sources_have_the_same_size_and_report_their_poison_rate():
    data, poison, ctx = _poisoned_context()
    oracle = resolve_clean_data(CleanDataParams(clean_source="oracle", fraction=0.25), data, ctx, "fp")
    random = resolve_clean_data(CleanDataParams(clean_source="random", fraction=0.25), data, ctx, "fp")
    assert len(oracle) == len(random) == reference_size(len(data), 0.25) == 50
    assert oracle.info["clean_poison_rate"] == 0.0 and not poison[oracle.indices].any()
    assert random.info["clean_poison_rate"] == pytest.approx(float(poison[random.indices].float().mean()))
    assert torch.equal(random.data.images, data.images[random.indices])
    again = resolve_clean_data(CleanDataParams(clean_source="random", fraction=0.25), data, ctx, "fp")
    assert torch.equal(again.indices, random.indices)  # seeded
    ctx.seed = 1
    other = resolve_clean_data(CleanDataParams(clean_source="random", fraction=0.25), data, ctx, "fp")
    assert not torch.equal(other.indices, random.indices)


def test_schedules_count_the_same_steps_whatever_the_number_of_samples():
    data, _, ctx = _poisoned_context()
    clean = resolve_clean_data(CleanDataParams(clean_source="random", fraction=0.1), data, ctx, "fp")
    big = copy.copy(clean)
    big.indices = torch.arange(150)  # e.g. CGD's clean part, 7.5x the reference size
    base = TrainConfig(epochs=1, batch_size=8)
    for c in (clean, big):
        cfg = c.train_config(base, epochs=3, lr=0.01, batch_size=8)
        steps_per_epoch = -(-len(c) // 8)
        assert round(cfg.epochs * steps_per_epoch) == c.steps(3, 8) == 8  # ceil(3 passes x 20 samples / 8)
        assert cfg.schedule == "cosine" and cfg.lr == 0.01


def test_oracle_outside_the_harness_is_a_clear_error():
    data, _, ctx = _poisoned_context()
    ctx.oracle_clean_subset = None
    with pytest.raises(CGDError, match="clean_source=oracle needs the harness's oracle clean subset"):
        resolve_clean_data(CleanDataParams(), data, ctx, "anp")


def test_cgd_source_parameters_carry_the_resolved_cgd_settings(monkeypatch):
    """Cache and grid keys are built from get_params(): with clean_source=cgd they must change when a
    CGD default does, or a model defended with another split would be reused."""
    from cgd_defense.defenses import cgd as cgd_module

    fp = create_defense("fp", preset="quick", clean_source="cgd", cgd_params={"sigma2": 0.05})
    cgd_params = fp.get_params()["cgd_params"]
    assert cgd_params == create_defense("cgd", preset="quick", sigma2=0.05).get_params()
    assert cgd_params["sigma2"] == 0.05 and cgd_params["retrain_epochs"] == 2  # given, then the quick preset's
    assert create_defense("fp", preset="quick", clean_source="oracle").get_params()["cgd_params"] == {}
    changed = copy.deepcopy(cgd_module.VARIANT_DEFAULTS)
    changed["improved"]["sigma_mode"] = "fixed"
    monkeypatch.setattr(cgd_module, "VARIANT_DEFAULTS", changed)
    assert create_defense("fp", preset="quick", clean_source="cgd", cgd_params={"sigma2": 0.05}).get_params() \
        != fp.get_params()


def test_cgd_source_yields_exactly_the_samples_cgd_labelled_clean(monkeypatch):
    from cgd_defense.defenses.cgd import CGD

    data, _, ctx = _poisoned_context()
    clean_mask = torch.zeros(len(data), dtype=torch.bool)
    clean_mask[torch.arange(30, 200, 3)] = True
    seen = {}

    def fake_split(self, train_set, context, *, val_set=None):
        seen["params"] = self.get_params()
        return Split(clean=clean_mask, suspect=~clean_mask, info={"fake": True})

    monkeypatch.setattr(CGD, "split", fake_split)
    got = resolve_clean_data(CleanDataParams(clean_source="cgd", cgd_params={"variant": "reference"}), data, ctx, "nad")
    assert torch.equal(got.indices, torch.nonzero(clean_mask).flatten())
    assert torch.equal(got.data.images, data.images[clean_mask]) and torch.equal(got.data.labels, data.labels[clean_mask])
    assert got.info["n_clean_samples"] == int(clean_mask.sum()) and got.info["clean_poison_rate"] == 0.0
    assert seen["params"]["variant"] == "reference"  # cgd_params reach CGD
    assert got.n_reference == reference_size(len(data), 0.05)  # the schedule still counts oracle-sized passes


# ---------------------------------------------------------------------------------------------- hand-built models

class TinyNet(nn.Module):
    """One 1x1-conv stage with hand-set weights, mean pooling, a linear head: `.stages`,
    `.classifier` and `forward_features` like every model of the package."""

    def __init__(self, batchnorm: bool = False):
        super().__init__()
        layers = [nn.Conv2d(3, 4, 1)] + ([nn.BatchNorm2d(4)] if batchnorm else []) + [nn.ReLU()]
        self.layers = nn.ModuleList([nn.Sequential(*layers)])
        self.linear = nn.Linear(4, 2)

    @property
    def stages(self):
        return list(self.layers)

    @property
    def classifier(self):
        return self.linear

    def forward_features(self, x):
        return self.layers[0](x).mean((2, 3))

    def forward(self, x):
        return self.linear(self.forward_features(x))


def _hand_built_fp_model() -> Classifier:
    """Channel means on the data below: ch3 0.05 < ch0 0.1 < ch1 0.5 (red, the class) < ch2 2.0.
    Only channel 1 decides the class; channels 0, 2, 3 add the same to both logits."""
    net = TinyNet()
    with torch.no_grad():
        net.layers[0][0].weight.zero_()
        net.layers[0][0].weight[1, 0] = 1.0
        net.layers[0][0].bias.copy_(torch.tensor([0.1, 0.0, 2.0, 0.05]))
        net.linear.weight.copy_(torch.tensor([[0.3, -4.0, 0.3, 0.3], [0.3, 4.0, 0.3, 0.3]]))
        net.linear.bias.copy_(torch.tensor([2.0, -2.0]))
    return Classifier(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), arch="tiny")


def _red_or_not(n: int = 40) -> ImageData:
    labels = torch.arange(n) % 2
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    images[labels == 1, 0] = 255
    return ImageData(images, labels, ["dark", "red"])


def test_fp_ranks_by_clean_activation_and_stops_before_accuracy_drops():
    model, data = _hand_built_fp_model(), _red_or_not()
    activation, features = last_stage_statistics(model, data.images, precision="fp32")
    assert torch.allclose(activation.mean(0), torch.tensor([0.1, 0.5, 2.0, 0.05]), atol=1e-6)
    order = torch.argsort(activation.mean(0))
    assert order.tolist() == [3, 0, 1, 2]
    keep, trace = choose_pruned_channels(features, data.labels, model.classifier, order, step=0.25, tolerance=0.1)
    assert keep.tolist() == [False, True, True, False]  # 3 and 0 go; pruning 1 breaks the classifier
    assert [t["n_pruned"] for t in trace] == [0, 1, 2, 3] and trace[-1]["accuracy"] == 0.5


def test_fp_bakes_its_mask_into_weights_that_survive_finetuning_and_load_strictly():
    model, data = _hand_built_fp_model(), _red_or_not()
    poison = torch.zeros(len(data), dtype=torch.bool)
    ctx = DefenseContext(dataset="toy", classes=data.classes, preset=get_preset("smoke"), cache=None, seed=0,
                         oracle_clean_subset=lambda f: (torch.arange(len(data)), data),
                         report_poison_rate=lambda idx: float(poison[idx].float().mean()))
    fp = FinePruning(fraction=0.99, prune_step=0.25, holdout=0.5, epochs=3, lr=0.05, batch_size=8).fit(
        model, data, context=ctx)
    weight = fp.model_.classifier.weight
    assert fp.info_["pruned_channels"] == [0, 3]
    assert (weight[:, [0, 3]] == 0).all() and (weight[:, [1, 2]] != 0).all()
    assert not torch.equal(weight[:, 1], model.classifier.weight[:, 1])  # fine-tuning did change the kept ones
    fresh = _hand_built_fp_model()
    fresh.net.load_state_dict(fp.model_.net.state_dict(), strict=True)
    x = data.images[:6]
    assert torch.allclose(fresh.eval()(x), fp.model_.eval()(x), atol=1e-5)


def test_anp_masks_and_noise_stay_in_bounds_and_pruning_zeroes_exactly_the_chosen_neurons():
    torch.manual_seed(0)
    model = Classifier(TinyNet(batchnorm=True), (0.5,) * 3, (0.25,) * 3)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (32,), generator=g)
    recipe = TrainConfig(precision="fp32", crop_padding=1)
    # a huge learning rate: without the projections masks and noise would leave their boxes at once
    state = optimise_neuron_masks(model, images, labels, iterations=4, batch_size=16, lr=50.0, eps=0.4, steps=2,
                                  alpha=0.2, recipe=recipe)
    masks = state.mask_values()
    assert ((masks >= 0) & (masks <= 1)).all() and ((masks == 0) | (masks == 1)).any()
    assert all(float(n.detach().abs().max()) <= 0.4 + 1e-7 for n in state.noise)
    assert state.names == ["layers.0.1"]
    original = model.net.layers[0][1].weight.detach().clone()

    pruned = neurons_to_prune(torch.tensor([0.9, 0.1, 0.2, 0.5]), by="threshold", threshold=0.2, count=None)
    assert pruned.tolist() == [False, True, True, False]
    assert neurons_to_prune(torch.tensor([0.9, 0.1, 0.2, 0.5]), by="number", threshold=0.2, count=3).tolist() == \
        [False, True, True, True]
    defended = copy.deepcopy(model)
    prune_neurons(defended, state, pruned)
    bn = defended.net.layers[0][1]
    assert (bn.weight[pruned] == 0).all() and torch.equal(bn.weight[~pruned], original[~pruned])
    assert torch.equal(model.net.layers[0][1].weight, original)  # the input model is untouched
    fresh = Classifier(TinyNet(batchnorm=True), (0.5,) * 3, (0.25,) * 3)
    fresh.net.load_state_dict(defended.net.state_dict(), strict=True)


def test_anp_needs_batchnorm_and_a_count_for_pruning_by_number():
    with pytest.raises(CGDError, match="has none"):
        NeuronPerturbation.attach(TinyNet())
    with pytest.raises(ConfigError, match="pruning_by=number needs count"):
        create_defense("anp", pruning_by="number")


def test_nad_attention_map_is_normalised_and_ignores_channel_order_and_sign():
    a = torch.randn(3, 5, 4, 4)
    att = attention_map(a, p=2.0)
    assert att.shape == (3, 16) and torch.allclose(att.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(attention_map(-a[:, torch.randperm(5)], 2.0), att, atol=1e-6)


def test_ibau_hypergradient_matches_the_explicit_fixed_point_formula():
    """d theta = d_theta L_out + (d_theta Phi)^T sum_{k<K} (d_delta Phi^T)^k d_delta L_out, with the
    Jacobians written out on a 2-class linear model small enough to form them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 1, 0, 1])
    delta0 = 0.3 * torch.randn(1, 1, 2, 2)
    rows = torch.tensor([1.0, 0, 0, 0, 0]).view(5, 1, 1, 1)
    params = list(net.parameters())
    got = implicit_hypergradient(net, params, x, y, delta0, rows, iterations=4, bf16=False, device="cpu")

    flat = torch.cat([p.detach().flatten() for p in params])
    shapes = [p.shape for p in params]

    def unflatten(theta):
        out, i = [], 0
        for s in shapes:
            n = int(torch.Size(s).numel())
            out.append(theta[i:i + n].view(s))
            i += n
        return out

    def logits(theta, inputs):
        w, b = unflatten(theta)
        return inputs.flatten(1) @ w.T + b

    def outer(d, theta):
        return nn.functional.cross_entropy(logits(theta, x + rows * d.view(1, 1, 2, 2)), y)

    def phi(d, theta):
        def inner(dd):
            return -nn.functional.cross_entropy(logits(theta, x + dd.view(1, 1, 2, 2)), y) + PERTURBATION_L2 * dd.pow(2).sum()
        return d - FIXED_POINT_STEP * torch.func.grad(inner)(d)

    d = delta0.flatten()
    g_delta = torch.func.grad(outer, argnums=0)(d, flat)
    g_theta = torch.func.grad(outer, argnums=1)(d, flat)
    j_delta = torch.func.jacrev(phi, argnums=0)(d, flat)   # (4, 4)
    j_theta = torch.func.jacrev(phi, argnums=1)(d, flat)   # (4, 10)
    v = torch.zeros(4)
    for _ in range(4):
        v = j_delta.T @ v + g_delta
    expected = g_theta + j_theta.T @ v
    assert torch.allclose(torch.cat([g.flatten() for g in got]), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- end to end

# The smoke preset's schedules, cut further: these runs check the plumbing, not the defenses' strength.
TEST_SCHEDULES = {"fp": {"epochs": 1}, "nad": {"teacher_epochs": 1, "epochs": 1}, "anp": {"iterations": 4},
                  "ibau": {"fixed_point_iters": 1}}
TEST_FRACTION = 0.02


@pytest.mark.slow
@pytest.mark.parametrize("source", ["oracle", "random", "cgd"])
@pytest.mark.parametrize("defense", ["fp", "nad", "anp", "ibau"])
def test_smoke_run_end_to_end(defense, source, mini_root, session_cache_dir):
    params = {"clean_source": source, "fraction": TEST_FRACTION, **TEST_SCHEDULES[defense]}
    if source == "cgd":
        from cgd_defense.defenses.cgd import split_for_run
        # test_cgd_run.py's CGD settings: one split, cached for all four defenses (and shared with it in a suite)
        params["cgd_params"] = {"variant": "reference", "suspicious_epochs": 1}
    result = run(RunConfig(defense=defense, defense_params=params, preset="smoke", data_root=str(mini_root),
                           cache_dir=str(session_cache_dir)))
    info = result["defense_info"]
    n_train = result["data"]["n_train"]
    assert info["clean_source"] == source and result["threat_model"] == "clean-subset"
    if source == "cgd":
        # exactly the samples of CGD's own split of this run (computed apart, from the same cache)
        split = split_for_run(RunConfig(defense="cgd", defense_params=params["cgd_params"], preset="smoke",
                                        data_root=str(mini_root), cache_dir=str(session_cache_dir)))
        assert info["n_clean_samples"] == len(split["clean_indices"]) == info["cgd_split_info"]["n_clean"] > 0
        assert info["clean_indices_sha256"] == tensor_digest(split["clean_indices"])
        assert result["clip_info"]["label"] == "stand-in CLIP"  # the CLIP behind the clean data, recorded
    else:
        assert result["clip_info"] is None
        assert info["n_clean_samples"] == reference_size(n_train, TEST_FRACTION)
    if source == "oracle":
        assert info["clean_poison_rate"] == 0.0
    else:
        assert 0.0 <= info["clean_poison_rate"] < 0.5
    assert result["clean_acc"] > 0.15  # still a classifier (10 classes; smoke trains for seconds)
    assert result["asr"] is not None and result["der"] is not None
