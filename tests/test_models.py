"""Models of the paper: parameter counts, strict pretrained loading, FX tracing, accuracy.

Model under test (option-A block at a stage change)::

    x ──conv1(s2)─bn1─relu─conv2─bn2──┐
    └──x[:, :, ::2, ::2]─pad(C/2)─────add─relu
"""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from ehap_fx.errors import EhapError, ModelError, WeightsError
from ehap_fx.models import (
    MODEL_NAMES,
    find_pretrained,
    get_model,
    load_pretrained,
    normalization,
    pretrained_model,
)
from ehap_fx.train import evaluate


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        ("resnet20", 10, 269_722),  # akamaster README / shared/weights README
        ("resnet32", 10, 464_154),
        ("resnet44", 10, 658_586),
        ("resnet56", 10, 853_018),
        ("resnet110", 10, 1_727_962),  # He et al. 2016 Table 6: 1.7M
        ("resnet56-b", 100, 861_620),  # chenyaofo cifar100_resnet56
        ("wrn-16-4", 10, 2_748_890),  # Zagoruyko & Komodakis Table 1: 2.7M
        ("wrn-28-8", 10, 23_354_842),  # WRN-28-8: 23.4M
        ("wrn-28-10", 10, 36_479_194),  # WRN-28-10: 36.5M
    ],
)
def test_parameter_counts(name, num_classes, expected):
    assert n_params(get_model(name, num_classes)) == expected


# The option-B ResNet-56 on CIFAR-10 adds two 1x1 convs + BNs: 16*32 + 2*32 + 32*64 + 2*64.
def test_option_b_adds_projection_parameters():
    assert n_params(get_model("resnet56-b")) - n_params(get_model("resnet56")) == 2_752


def test_wrn_dropout_module_only_when_asked():
    assert not any(isinstance(m, torch.nn.Dropout) for m in get_model("wrn-16-4").modules())
    drops = [m for m in get_model("wrn-16-4", dropout=0.3).modules()
             if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 6 and all(m.p == 0.3 for m in drops)


@pytest.mark.parametrize("name", ["resnet21", "resnet56-c", "wrn-27-8", "vgg16", ""])
def test_unknown_name_lists_known_names(name):
    with pytest.raises(ModelError, match="known: resnet20, resnet32") as info:
        get_model(name)
    assert isinstance(info.value, EhapError)


def test_names_are_case_insensitive_and_parse_other_depths():
    model = get_model("ResNet1202")
    assert (model.depth, model.shortcut) == (1202, "A")
    assert get_model("wrn-40-2").widen == 2


def test_normalization_per_source():
    assert normalization("resnet56").mean == (0.485, 0.456, 0.406)  # akamaster: ImageNet
    assert normalization("resnet56-b", "cifar100").std == (0.2673, 0.2564, 0.2761)
    assert normalization("wrn-28-8").mean == (0.4914, 0.4822, 0.4465)  # CIFAR-10 statistics
    with pytest.raises(ModelError, match="unknown dataset='svhn'"):
        normalization("resnet20", "svhn")


# --------------------------------------------------------------------------- tracing

HEAVY = {"resnet110", "resnet110-b", "resnet32-b", "resnet44-b", "wrn-16-8", "wrn-28-10"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in MODEL_NAMES],
)
def test_traces_and_matches_eager(name):
    model = get_model(name, 100 if name.endswith("-b") else 10).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_option_a_shortcut_traces_to_slice_and_pad():
    gm = fx.symbolic_trace(get_model("resnet20"))
    pads = [n for n in gm.graph.nodes if n.target is F.pad]
    slices = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert [n.args[1] for n in pads] == [(0, 0, 0, 0, 8, 8), (0, 0, 0, 0, 16, 16)]
    assert [n.args[1][2:] for n in slices] == [(slice(None, None, 2),) * 2] * 2
    assert not any(n.op == "call_module" and "downsample" in n.target for n in gm.graph.nodes)


def test_option_b_shortcut_is_conv_bn():
    gm = fx.symbolic_trace(get_model("resnet20-b"))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert [t for t in targets if "downsample" in t] == [
        "layer2.0.downsample.0", "layer2.0.downsample.1",
        "layer3.0.downsample.0", "layer3.0.downsample.1",
    ]
    assert not any(n.target is F.pad for n in gm.graph.nodes)


# --------------------------------------------------------------------------- pretrained

CHECKPOINTS = [
    ("resnet20", "cifar10"),
    ("resnet32", "cifar10"),
    ("resnet44", "cifar10"),
    ("resnet56", "cifar10"),
    ("resnet110", "cifar10"),
    ("resnet56-b", "cifar100"),
]


@pytest.mark.parametrize(("name", "dataset"), CHECKPOINTS)
def test_pretrained_loads_strictly(weights_dir, name, dataset):
    try:
        path = find_pretrained(name, weights_dir, dataset)
    except WeightsError:
        pytest.skip(f"no {name} {dataset} checkpoint in {weights_dir}")
    model = get_model(name, 100 if dataset == "cifar100" else 10)
    load_pretrained(model, path)
    raw = torch.load(path, weights_only=True, map_location="cpu")
    raw = raw.get("state_dict", raw)
    head = "module.linear.weight" if "module.linear.weight" in raw else "fc.weight"
    torch.testing.assert_close(model.fc.weight, raw[head], rtol=0, atol=0)
    assert model.layer1[0].conv1.weight.abs().sum() > 0


def test_pretrained_loads_into_traced_graph(weights_dir):
    path = find_pretrained("resnet20", weights_dir)
    gm = fx.symbolic_trace(get_model("resnet20"))
    load_pretrained(gm, path)
    reference = load_pretrained(get_model("resnet20"), path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), reference(x), rtol=0, atol=0)


def test_wrong_architecture_names_keys(weights_dir):
    path = find_pretrained("resnet32", weights_dir)
    with pytest.raises(WeightsError, match=r"unexpected keys: layer1\.3\.conv1\.weight") as info:
        load_pretrained(get_model("resnet20"), path)
    assert "(60 in all)" in str(info.value)
    with pytest.raises(WeightsError, match=r"missing keys: layer1\.5\.conv1\.weight"):
        load_pretrained(get_model("resnet44"), path)


def test_wrong_num_classes_names_shapes(weights_dir):
    try:
        path = find_pretrained("resnet56-b", weights_dir, "cifar100")
    except WeightsError:
        pytest.skip("no CIFAR-100 ResNet-56 checkpoint")
    shapes = r"fc\.weight: checkpoint \(100, 64\) vs model \(10, 64\)"
    with pytest.raises(WeightsError, match=shapes):
        load_pretrained(get_model("resnet56-b", 10), path)


def test_option_a_checkpoint_does_not_fit_option_b(weights_dir):
    path = find_pretrained("resnet20", weights_dir)
    with pytest.raises(WeightsError, match=r"missing keys: layer2\.0\.downsample\.0\.weight"):
        load_pretrained(get_model("resnet20-b"), path)


def test_unreadable_and_absent_checkpoints(tmp_path):
    bad = tmp_path / "resnet20-00000000.th"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        load_pretrained(get_model("resnet20"), bad)
    with pytest.raises(WeightsError, match="does not exist"):
        load_pretrained(get_model("resnet20"), tmp_path / "nope.th")
    (tmp_path / "resnet20-11111111.th").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"2 files \(resnet20-00000000\.th, resnet20-1111"):
        find_pretrained("resnet20", tmp_path)
    with pytest.raises(WeightsError, match=r"no file matching 'resnet56-\*\.th'"):
        find_pretrained("resnet56", tmp_path)
    with pytest.raises(WeightsError, match="no known pretrained source for 'wrn-28-8'"):
        find_pretrained("wrn-28-8", tmp_path)


def test_prefixed_state_dict_round_trip(tmp_path):
    """A DataParallel-style ``{"state_dict": {"module.linear..."}}`` file loads into ``fc``."""
    source = get_model("resnet20")
    state = {f"module.{k}".replace("module.fc.", "module.linear."): v
             for k, v in source.state_dict().items()}
    path = tmp_path / "ckpt.th"
    torch.save({"state_dict": state, "best_prec1": 0.0}, path)
    target = load_pretrained(get_model("resnet20"), path)
    torch.testing.assert_close(target.fc.bias, source.fc.bias, rtol=0, atol=0)


def test_pretrained_resnet20_top1(weights_dir, cifar10_root):
    """81.03 % on the full JPEG-q75 test set (weights README); 80.80 % on its first 2,000."""
    from ehap_fx.data import load_cifar

    model = pretrained_model("resnet20", weights_dir)
    test = load_cifar(cifar10_root, "cifar10", "test")
    top1 = evaluate(model, test.loader(500, limit=2000, normalization=normalization("resnet20")))
    # a deterministic evaluation: 1,616 of the 2,000 images (measured with 1 and 2 threads); one
    # image is 0.05 pt, so this pins the count exactly
    assert top1 == pytest.approx(100 * 1616 / 2000, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Weights that download: torch.hub's cache, sha256-checked (offline: a pre-filled cache, file://)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch.hub cache in tmp_path (by TORCH_HOME: ``torch.hub.set_dir`` would pin the
    directory for every later test of the process, whatever TORCH_HOME they set)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("EHAP_PRETRAINED_URL", raising=False)
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return tmp_path / "hub" / "checkpoints"


def test_pretrained_from_a_prefilled_hub_cache(weights_dir, hub, monkeypatch):
    import shutil

    from ehap_fx.models import CHECKPOINTS, pretrained_model

    hub.mkdir(parents=True)
    shutil.copy(weights_dir / "resnet20-12fca82f.th", hub)
    monkeypatch.setenv("EHAP_PRETRAINED_URL", "http://127.0.0.1:9")  # any download would fail
    model = pretrained_model("resnet20")
    reference = pretrained_model("resnet20", weights_dir)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert CHECKPOINTS[("resnet20", "cifar10")].file == "resnet20-12fca82f.th"


def test_pretrained_downloads_into_the_hub_cache(weights_dir, hub, monkeypatch):
    from ehap_fx.models import download_pretrained

    monkeypatch.setenv("EHAP_PRETRAINED_URL", weights_dir.as_uri())  # a local "mirror"
    path = download_pretrained("resnet56", progress=False)
    assert path == hub / "resnet56-4bfd9763.th"
    assert path.read_bytes() == (weights_dir / "resnet56-4bfd9763.th").read_bytes()


def test_download_errors_name_the_url_and_leave_nothing(hub, tmp_path, monkeypatch):
    from ehap_fx.models import download_pretrained

    monkeypatch.setenv("EHAP_PRETRAINED_URL", "http://127.0.0.1:9/w")
    with pytest.raises(WeightsError, match=r"downloading http://127.0.0.1:9/w/resnet32-d509ac18.th failed.*--pretrained-dir"):
        download_pretrained("resnet32", progress=False)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "resnet32-d509ac18.th").write_bytes(b"tampered")
    monkeypatch.setenv("EHAP_PRETRAINED_URL", mirror.as_uri())
    with pytest.raises(WeightsError, match="wrong sha256"):
        download_pretrained("resnet32", progress=False)
    assert not hub.exists() or not list(hub.iterdir())
    hub.mkdir(parents=True, exist_ok=True)
    (hub / "resnet32-d509ac18.th").write_bytes(b"tampered")  # a corrupted cache is caught too
    with pytest.raises(WeightsError, match="expected d509ac1820d7"):
        download_pretrained("resnet32", progress=False)
    with pytest.raises(WeightsError, match="no public checkpoint of 'wrn-28-8'"):
        download_pretrained("wrn-28-8")
