import pytest
import torch

from cgd_defense.harness.augment import random_crop_flip
from cgd_defense.harness.trainer import TrainConfig, predict, train
from cgd_defense.models import Classifier, create_model, list_models
from cgd_defense.errors import ConfigError


@pytest.mark.parametrize("name", ["fastnet", "fastnet_small", "preactresnet18", "resnet18"])
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


def test_per_sample_loss_tracking_and_index_pool():
    images, labels = _toy()
    model = Classifier(create_model("fastnet_small", 2), (0.5,) * 3, (0.25,) * 3)
    pool = torch.tensor([0, 1, 2, 3, 3, 3])  # duplicates = oversampling
    res = train(model, images, labels, TrainConfig(epochs=2, batch_size=4, precision="fp32"), indices=pool,
                track_loss=True)
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
