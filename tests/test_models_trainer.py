import copy

import pytest
import torch

from cgd_defense.harness.augment import random_crop_flip
from cgd_defense.harness.trainer import TrainConfig, _lookahead, _lr_lambda, make_optimizer, predict, train
from cgd_defense.models import Classifier, create_model, list_models
from cgd_defense.models.fusion import batchnorm_as_affine, fold_conv_batchnorm
from cgd_defense.errors import ConfigError


@pytest.mark.parametrize("name", ["fastnet", "fastnet_small", "fastnet_whitened", "preactresnet18", "resnet18"])
def test_models_forward_shapes(name):
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape[0] == 2
    assert model.classifier.out_features == 7


def test_preactresnet18_state_dict_matches_backdoorbench_layout():
    keys = list(create_model("preactresnet18", 10).state_dict())
    assert len(keys) == 102
    assert keys[0] == "conv1.weight" and keys[1] == "layer1.0.bn1.weight" and keys[-2:] == ["linear.weight", "linear.bias"]
    assert [k for k in keys if "shortcut" in k] == [f"layer{i}.0.shortcut.0.weight" for i in (2, 3, 4)]


@pytest.mark.parametrize("name", ["fastnet", "fastnet_whitened"])
def test_folding_batchnorm_into_convolutions_keeps_the_function(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # running statistics and affine terms far from the identity they start at
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.2, 3.0)
        if norm.weight.requires_grad:
            norm.weight.data.uniform_(0.5, 2.0)
        norm.bias.data.normal_()
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match="eval mode"):
        fold_conv_batchnorm(model)
    model.eval()
    expected = model(x)
    folded = fold_conv_batchnorm(copy.deepcopy(model))
    torch.testing.assert_close(folded(x), expected, atol=1e-4, rtol=1e-4)
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # FastNet's conv -> BN pairs all sit in Sequentials; the whitened net pools between conv and BN.
    assert left == (0 if name == "fastnet" else len(norms))


def test_batchnorm_as_affine_keeps_first_and_second_order_gradients():
    from cgd_defense.defenses.ibau import implicit_hypergradient
    torch.manual_seed(0)
    model = create_model("fastnet_small", num_classes=5)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.normal_()
        norm.bias.data.normal_()
    with pytest.raises(ValueError, match="eval mode"), batchnorm_as_affine(model):
        pass
    model.eval()
    params = list(model.parameters())
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    delta, rows = 0.1 * torch.randn(1, 3, 32, 32), torch.tensor([1.0, 0, 0, 1, 0, 0]).view(6, 1, 1, 1)

    def hypergradient():
        return implicit_hypergradient(model, params, x, y, delta, rows, iterations=3, bf16=False,
                                      device=torch.device("cpu"))

    expected, expected_out = hypergradient(), model(x)
    with batchnorm_as_affine(model):
        assert all("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        torch.testing.assert_close(model(x), expected_out, atol=1e-5, rtol=1e-5)
        for got, want in zip(hypergradient(), expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not any("forward" in vars(m) for m in model.modules())  # BatchNorm's own forward is back


def test_unknown_model_lists_known():
    with pytest.raises(ConfigError, match="unknown model 'resnet19'. Did you mean 'resnet18'"):
        create_model("resnet19", 10)
    assert "preactresnet18" in list_models("preact*")


def test_crop_flip_is_a_shifted_copy():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float).view(2, 3, 6, 6)
    out = random_crop_flip(x, padding=2, flip=False, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        assert any(torch.equal(out[b], padded[b, :, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))
    flipped = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    for b in range(2):
        assert torch.equal(flipped[b], x[b]) or torch.equal(flipped[b], x[b].flip(2))


def _toy():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat(32)
    images = torch.randint(0, 60, (64, 3, 16, 16), dtype=torch.uint8, generator=g)
    images[labels == 1, 0] += 150  # class 1 is redder: learnable
    return images, labels


def test_training_is_deterministic_and_learns():
    images, labels = _toy()
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.05, precision="fp32", channels_last=False)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Classifier(create_model("fastnet_small", 2), (0.5,) * 3, (0.25,) * 3)
        train(model, images, labels, cfg, seed=1)
        weights.append(model.net.linear.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    acc = (predict(model, images, precision="fp32").argmax(1) == labels).float().mean()
    assert acc > 0.9


def test_per_sample_loss_tracking_and_index_pool(caplog):
    images, labels = _toy()
    model = Classifier(create_model("fastnet_small", 2), (0.5,) * 3, (0.25,) * 3)
    pool = torch.tensor([0, 1, 2, 3, 3, 3])  # duplicates = oversampling
    with caplog.at_level("INFO", logger="cgd_defense"):
        res = train(model, images, labels, TrainConfig(epochs=2, batch_size=4, precision="fp32"), indices=pool,
                    track_loss=True, desc="toy")
    epochs_logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("toy: epoch")]
    assert [m.split(",")[0] for m in epochs_logged] == ["toy: epoch 1/2", "toy: epoch 2/2"]  # what run.log shows
    assert f"loss {res.history[-1]['loss']:.4f}" in epochs_logged[-1]
    assert res.sample_losses.shape == (2, 64)
    seen = ~torch.isnan(res.sample_losses[0])
    assert seen.nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(optimizer="lbfgs")


def test_a_model_first_moved_by_predict_can_still_be_trained():
    """`predict` may move a model to another layout or device (ASD and DBD score a fresh model
    before training it; FP reads activations before fine-tuning). Done inside inference mode, the
    copied weights became inference tensors and the next training step failed (seen on CUDA in
    ASD's MixMatch loop); channels_last on the CPU takes the same path."""
    torch.manual_seed(0)
    model = Classifier(create_model("fastnet_small", 10), (0.5,) * 3, (0.25,) * 3)
    model = model.to(memory_format=torch.contiguous_format)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    before = predict(model, images, channels_last=True)
    assert before.shape == (64, 10)
    assert not any(p.is_inference() for p in model.parameters())
    result = train(model, images, labels, TrainConfig(epochs=1, batch_size=32, augment=False), desc="t")
    assert result.steps == 2 and not torch.equal(predict(model, images), before)


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                                           ("fpu avx2 avx512f avx512_vnni", False)])
def test_bf16_is_used_on_cpus_that_compute_it_in_hardware(tmp_path, flags, native):
    from cgd_defense.harness.precision import cpu_has_native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(cpuinfo)) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_keeping_freed_memory_is_set_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from cgd_defense.harness.precision import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    assert keep_freed_memory.__wrapped__() is True
    monkeypatch.setenv("CGD_MALLOC_TUNING", "0")
    assert keep_freed_memory.__wrapped__() is False


def test_whitening_stem_decorrelates_patches_once_and_survives_a_state_dict_round_trip():
    g = torch.Generator().manual_seed(0)
    # Correlated channels and neighbouring pixels: what a whitening stem has to undo.
    base = torch.randn(64, 1, 17, 17, generator=g)
    images = (base[:, :, :16, :16] + 0.5 * base[:, :, 1:, 1:]).repeat(1, 3, 1, 1) + 0.3 * torch.randn(64, 3, 16, 16, generator=g)
    net = create_model("fastnet_whitened", 10)
    net.init_from_data(images)
    w = net.whiten.weight.detach()
    assert torch.equal(w[12:], -w[:12]) and not w.requires_grad
    out = torch.nn.functional.conv2d(images, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(out.T)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=0.05)
    net.init_from_data(images * 3)  # already initialised: left as it is
    assert torch.equal(net.whiten.weight, w)
    fresh = create_model("fastnet_whitened", 10)
    fresh.load_state_dict(net.state_dict())
    fresh.init_from_data(images * 3)
    assert torch.equal(fresh.whiten.weight, w)
    assert all(not m.weight.requires_grad for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_recipe_options_are_left_out_of_the_dump_at_their_defaults():
    """Cache and grid job keys hash the dump: options added later must not change old keys."""
    assert "lookahead" not in TrainConfig().model_dump() and "pad_mode" not in TrainConfig().model_dump()
    cfg = TrainConfig(lookahead=True, pad_mode="reflect", flip="alternating", bias_lr_scale=64)
    dump = cfg.model_dump(mode="json")
    assert dump["lookahead"] is True and dump["pad_mode"] == "reflect" and dump["flip"] == "alternating"
    assert TrainConfig(**dump) == cfg
    with pytest.raises(ValueError):
        TrainConfig(flip="sometimes")


def test_warmup_start_and_bias_learning_rate_scale():
    cfg = TrainConfig(lr=0.5, warmup=0.5, warmup_start=0.2, bias_lr_scale=4, bias_weight_decay=1e-3)
    f = _lr_lambda(cfg, 10)
    assert f(0) == pytest.approx(0.2 + 0.8 / 5) and f(4) == pytest.approx(1.0) and f(10) == 0.0
    groups = make_optimizer(create_model("fastnet_small", 2), cfg).param_groups
    assert [g["lr"] for g in groups] == [0.5, 2.0]
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 1e-3]


def test_lookahead_pulls_fast_weights_to_the_slow_copy():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    slow = {"weight": torch.zeros(1, 2)}
    _lookahead(net, slow, rate=0.75)
    assert torch.allclose(slow["weight"], torch.full((1, 2), 0.25)) and torch.equal(net.weight.data, slow["weight"])


def test_alternating_flip_flips_each_image_on_every_other_epoch():
    images, labels = _toy()
    seen = {}

    def record(logits, batch):
        for i, x in zip(batch.idx.tolist(), batch.x):
            seen.setdefault(i, []).append(x.clone())
        return torch.nn.functional.cross_entropy(logits, batch.y)

    cfg = TrainConfig(epochs=3, batch_size=16, crop_padding=0, flip="alternating", precision="fp32",
                      channels_last=False, lookahead=True)
    model = Classifier(create_model("fastnet_small", 2), (0.5,) * 3, (0.25,) * 3)
    train(model, images, labels, cfg, loss_fn=record)
    originals = images.float() / 255
    flipped_first = 0
    for i, xs in seen.items():
        assert len(xs) == 3
        assert torch.equal(xs[0], xs[1].flip(2)) and torch.equal(xs[0], xs[2])
        assert torch.equal(xs[0], originals[i]) or torch.equal(xs[0], originals[i].flip(2))
        flipped_first += torch.equal(xs[0], originals[i].flip(2))
    assert 0 < flipped_first < len(seen)


def test_reflect_padding_copies_the_border():
    x = torch.ones(4, 3, 5, 5)
    out = random_crop_flip(x, padding=2, flip=False, generator=torch.Generator().manual_seed(0), pad_mode="reflect")
    assert torch.equal(out, x)
    zero_padded = random_crop_flip(x, padding=2, flip=False, generator=torch.Generator().manual_seed(0))
    assert (zero_padded == 0).any()


def test_the_cpu_preset_recipe_trains_its_whitened_network():
    """The `cpu` preset's own recipe (lookahead, bias learning-rate scale, alternating flips, reflect
    padding, warm start) on toy data: the stem is whitened from the data and the model learns."""
    from cgd_defense.harness.presets import get_preset

    preset = get_preset("cpu")
    images, labels = _toy()
    cfg = preset.train.model_copy(update={"epochs": 8, "batch_size": 16, "precision": "fp32", "channels_last": False})
    # The toy images' own statistics, as the harness normalises with the dataset's: the whitening stem
    # does not centre its input, and far off-centre patches would leave its GELUs dead.
    pixels = images.float().div(255)
    torch.manual_seed(0)
    model = Classifier(create_model(preset.model, 2), pixels.mean((0, 2, 3)).tolist(), pixels.std((0, 2, 3)).tolist())
    assert model.needs_data_init
    train(model, images, labels, cfg, seed=0)
    assert not model.needs_data_init and bool(model.net.whitened)
    assert (predict(model, images, precision="fp32").argmax(1) == labels).float().mean() > 0.9
