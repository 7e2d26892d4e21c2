"""Contract tests over the architecture registry (after timm's tests/test_models.py)."""

from __future__ import annotations

import pytest
import torch

from training.models import EmbeddingClassifier, arch_for, build_discriminator, create_model, list_models

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "stl10": (3, 96, 96), "tinyimagenet": (3, 64, 64)}
CLASSES = {"mnist": 10, "cifar10": 10, "stl10": 10, "tinyimagenet": 200}
EMBED = {"er_mnist": 4, "er_cifar10": 16, "er_stl10": 16, "er_tinyimagenet": 20}
# Penultimate widths of the Figure 8 baselines (their "embedding").
BASELINE_FEATURES = {"lenet_mnist": 500, "vgg19_cifar10": 512, "cnn_stl10": 256, "vgg16_tinyimagenet": 4096}
# Parameter counts of the paper-size networks, as built from Figures 8-10.
PARAMS = {
    "er_mnist": 11_154_618,
    "lenet_mnist": 431_080,
}


def _geometry(name: str) -> str:
    return name.split("_", 1)[1]


def test_registry_lists_all_paper_architectures() -> None:
    assert set(list_models()) == set(EMBED) | set(BASELINE_FEATURES)
    assert list_models("er_*") == sorted(EMBED)


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="er_mnist"):
        create_model("resnet_imagenet")


@pytest.mark.parametrize("name", sorted(EMBED) + sorted(BASELINE_FEATURES))
def test_model_builds_shapes_and_gradients(name: str) -> None:
    """Slim variants (fast on CPU): right shapes, finite outputs, a gradient on every parameter."""
    torch.manual_seed(0)
    model = create_model(name, width=0.125)
    assert isinstance(model, EmbeddingClassifier)
    geo = _geometry(name)
    x = torch.rand(2, *SHAPES[geo])
    model.train()
    z = model.forward_features(x)
    logits = model.forward_head(z)
    expected_embed = EMBED.get(name)
    if expected_embed is not None:
        assert z.shape == (2, expected_embed)
    assert z.shape == (2, model.embed_dim)
    assert logits.shape == (2, CLASSES[geo])
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"


@pytest.mark.parametrize("name", ["er_mnist", "lenet_mnist"])
def test_paper_size_parameter_counts(name: str) -> None:
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name,features", sorted(BASELINE_FEATURES.items()))
def test_baseline_embedding_is_penultimate_layer(name: str, features: int) -> None:
    model = create_model(name)
    assert model.embed_dim == features
    assert model.classifier.in_features == features


def test_embed_dim_override_and_width_multiplier() -> None:
    model = create_model("er_mnist", embed_dim=13, width=0.25)
    assert model.forward_features(torch.rand(3, 1, 28, 28)).shape == (3, 13)
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]


def test_forward_composes_features_and_head() -> None:
    model = create_model("er_mnist", width=0.25).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(model.forward_features(x)))


def test_normalization_lives_inside_the_model() -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    model = create_model("er_cifar10", width=0.125, mean=mean, std=std).eval()
    plain = create_model("er_cifar10", width=0.125).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")})
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(expected), atol=1e-5)
    assert "normalize.mean" in model.state_dict()


def test_variational_encoder_returns_mean_at_inference() -> None:
    model = create_model("er_mnist", width=0.125, variational=True).eval()
    x = torch.rand(2, 1, 28, 28)
    mu, logvar = model.encoder.distribution(x)
    assert mu.shape == logvar.shape == (2, 4)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), mu.detach())


def test_rse_noise_and_ensemble() -> None:
    torch.manual_seed(0)
    model = create_model("lenet_mnist", noise_init=0.2, noise_inner=0.1, ensemble=4).eval()
    noise = [m for m in model.modules() if type(m).__name__ == "GaussianNoise"]
    assert [m.std for m in noise] == [0.2, 0.1]
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b), "RSE inference must stay stochastic"
    assert torch.allclose(a.exp().sum(1), torch.ones(2), atol=1e-5), "ensemble output is log-probabilities"


def test_discriminator_matches_figure_10() -> None:
    d = build_discriminator(4)
    linears = [m for m in d if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (4, 512),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 1),
    ]
    assert isinstance(d[-1], torch.nn.LogSigmoid)
    out = d(torch.randn(5, 4))
    assert out.shape == (5, 1) and (out <= 0).all()


@pytest.mark.parametrize(
    "dataset,family,arch",
    [
        ("mnist", "er", "er_mnist"),
        ("fashion-mnist", "er", "er_mnist"),
        ("fashion-mnist", "baseline", "lenet_mnist"),
        ("cifar10", "baseline", "vgg19_cifar10"),
        ("tiny-imagenet", "er", "er_tinyimagenet"),
    ],
)
def test_arch_for_dataset(dataset: str, family: str, arch: str) -> None:
    assert arch_for(dataset, family) == arch


@pytest.mark.parametrize(
    "shape,family,arch",
    [
        ((1, 28, 28), "er", "er_mnist"),
        ((3, 28, 28), "er", "er_mnist"),
        ((3, 32, 32), "er", "er_cifar10"),
        ((3, 40, 40), "er", "er_cifar10"),
        ((3, 48, 48), "er", "er_cifar10"),
        ((3, 64, 64), "baseline", "vgg16_tinyimagenet"),
        ((1, 80, 80), "er", "er_tinyimagenet"),
        ((1, 20, 20), "er", "er_mnist"),
        ((3, 96, 96), "baseline", "cnn_stl10"),
        ((3, 200, 150), "er", "er_stl10"),
    ],
)
def test_arch_for_an_image_folder_is_the_closest_paper_network(shape, family: str, arch: str) -> None:
    assert arch_for("folder:/data/pets", family, shape) == arch


def test_arch_for_an_unknown_dataset_without_a_shape_is_refused() -> None:
    with pytest.raises(KeyError, match="give its shape"):
        arch_for("folder:/data/pets", "er")


@pytest.mark.parametrize("name", sorted(EMBED) + sorted(BASELINE_FEATURES))
@pytest.mark.parametrize("in_chans,grow", [(3, (8, 8)), (1, (40, 20))])
def test_every_architecture_fits_other_input_sizes_and_channels(name: str, in_chans: int, grow) -> None:
    """The paper's convolutions on another geometry (larger than the paper's input, which is what
    arch_for picks them for): the layer after them is sized by a dry run."""
    side = SHAPES[_geometry(name)][1]
    size = (side + grow[0], side + grow[1])
    model = create_model(name, width=0.125, num_classes=3, in_chans=in_chans, input_size=list(size))
    assert isinstance(model, EmbeddingClassifier)
    model.eval()
    x = torch.rand(2, in_chans, *size)
    assert model(x).shape == (2, 3) and model.forward_features(x).shape == (2, model.embed_dim)


@pytest.mark.parametrize("name", sorted(EMBED) + sorted(BASELINE_FEATURES))
def test_paper_geometry_given_explicitly_builds_the_same_network(name: str) -> None:
    geo = SHAPES[_geometry(name)]
    a = create_model(name, width=0.125)
    b = create_model(name, width=0.125, in_chans=geo[0], input_size=list(geo[1:]))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize("shape", [(3, 80, 80), (1, 16, 16), (3, 31, 200), (3, 100, 97)])
@pytest.mark.parametrize("family", ["er", "baseline"])
def test_the_network_arch_for_picks_takes_the_input(shape, family: str) -> None:
    arch = arch_for("folder:/x", family, shape)
    model = create_model(arch, width=0.125, in_chans=shape[0], input_size=list(shape[1:]), num_classes=2)
    assert model.eval()(torch.rand(1, *shape)).shape == (1, 2)


def test_an_input_too_small_for_the_downsampling_is_refused() -> None:
    with pytest.raises(ValueError, match="8x8 input is too small"):
        create_model("er_cifar10", width=0.125, input_size=[8, 8])
    with pytest.raises(ValueError, match="80x80 input is too small"):
        create_model("er_stl10", width=0.125, input_size=[80, 80])
