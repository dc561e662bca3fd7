import pytest
import torch

from cgd_defense.attacks import parse_attack, poison_training_set, trigger_test_set
from cgd_defense.attacks.spec import load_attack_file
from cgd_defense.data import ImageData
from cgd_defense.errors import ConfigError
from cgd_defense.registry import create_attack, get_attack, list_attacks

GOOD = {"name": "x", "citation": "c", "family": "dirty-label",
        "trigger": {"kind": "patch", "size": 3, "pattern": "white"},
        "poisoning": {"ratio": 0.1, "target": 0}}


def test_shipped_attacks_validate():
    assert {"badnets", "blended", "clean"} <= set(list_attacks())
    spec = get_attack("badnets")
    assert spec.poisoning.ratio == 0.1 and spec.poisoning.target == 0 and spec.poisoning.label_mode == "all-to-one"
    assert get_attack("blended").trigger[0].params["alpha"] == 0.2


@pytest.mark.parametrize("patch,message", [
    ({"poisoning": {"ratio": 1.5}}, r"x.yaml: field 'poisoning.ratio' .*less than 1.*1.5"),
    ({"trigger": {"kind": "sparkle"}}, r"x.yaml: trigger\[0\]: unknown kind 'sparkle'; allowed kinds: .*patch"),
    ({"trigger": {"kind": "patch", "size": 3, "colour": "red"}}, r"trigger\[0\]: unknown field 'colour'"),
    ({"trigger": {"kind": "patch", "location": "middle"}}, r"field 'location' must be one of .*bottom-right"),
    ({"family": "weird"}, r"field 'family' must be one of"),
    ({"trigger": {"kind": "blend", "source": "image", "image": "missing.png"}}, r"image file not found: .*missing.png"),
    ({"poisoning": {"label_mode": "many"}}, r"poisoning.label_mode"),
])
def test_validation_errors_name_file_field_and_allowed_values(patch, message, tmp_path):
    data = {**GOOD, **patch}
    with pytest.raises(ConfigError, match=message):
        parse_attack(data, "x.yaml", base_dir=tmp_path)


def test_malformed_yaml_file_names_the_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\ntrigger: [kind: patch\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML \(line"):
        load_attack_file(f)


def test_name_must_match_file_stem(tmp_path):
    f = tmp_path / "other.yaml"
    f.write_text("name: x\ncitation: c\nfamily: dirty-label\ntrigger: {kind: none}\n")
    with pytest.raises(ConfigError, match="must match"):
        load_attack_file(f)


def test_overrides_reach_trigger_components_by_index_or_directly_when_there_is_one():
    assert create_attack("blended", **{"trigger.alpha": 0.3}).trigger[0].params["alpha"] == 0.3
    assert create_attack("blended", **{"trigger.0.alpha": 0.4}).trigger[0].params["alpha"] == 0.4
    with pytest.raises(ConfigError, match=r"override 'trigger.3.alpha': 'trigger' holds 1 items"):
        create_attack("blended", **{"trigger.3.alpha": 0.4})
    with pytest.raises(ConfigError, match=r"'poisoning.ratio' is a value, not a section"):
        create_attack("blended", **{"poisoning.ratio.low": 0.4})
    with pytest.raises(ConfigError, match="alpha"):  # out of range: the schema still validates the result
        create_attack("blended", **{"trigger.alpha": 7})


def test_an_image_path_given_as_an_override_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "pictures" / "pic.png")
    monkeypatch.chdir(tmp_path)
    spec = create_attack("blended", **{"trigger.source": "image", "trigger.image": "pictures/pic.png"})
    assert spec.trigger[0].params["image"] == str(tmp_path / "pictures" / "pic.png")
    monkeypatch.chdir(tmp_path / "pictures")
    with pytest.raises(ConfigError, match=r"image file not found: .*pictures/pictures/pic.png"):
        create_attack("blended", **{"trigger.source": "image", "trigger.image": "pictures/pic.png"})


def test_badnets_poisons_exact_count_and_pixels(tiny_data):
    spec = create_attack("badnets", **{"poisoning.ratio": 0.25})
    data = ImageData(tiny_data.images, tiny_data.labels, tiny_data.classes)
    p = poison_training_set(spec, data)
    assert int(p.poison_mask.sum()) == 15  # round(0.25 * 60), drawn from non-target samples
    assert (p.original_labels[p.poison_mask] != 0).all() and (p.labels[p.poison_mask] == 0).all()
    assert (p.images[p.poison_mask][:, :, 5:8, 5:8] == 255).all()  # white 3x3 bottom-right of 8x8
    assert torch.equal(p.images[~p.poison_mask], data.images[~p.poison_mask])
    t = trigger_test_set(spec, data)
    assert len(t.true_labels) == 40 and (t.attack_labels == 0).all() and (t.true_labels != 0).all()


def test_blend_pixels_are_convex_combination(tiny_data):
    spec = create_attack("blended", **{"poisoning.ratio": 0.5})
    p = poison_training_set(spec, tiny_data)
    comp = spec.components(8)[0]
    i = int(p.poison_indices[0])
    x = tiny_data.images[i].float() / 255
    expected = ((0.8 * x + 0.2 * comp.target) * 255).round()
    assert torch.allclose(p.images[i].float(), expected, atol=1)
