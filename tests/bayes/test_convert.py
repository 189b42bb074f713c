"""bayesianize: every parameter of any module gets a posterior; names, values, copies, saving."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from bbb_lightning.bayes import (
    BayesianLayer,
    BayesianLinear,
    GaussianPrior,
    MeanFieldNormal,
    VariationalPosterior,
    all_posteriors,
    bayesianize,
    is_bayesian,
    kl_divergence,
    named_posteriors,
    posterior_kl,
    posterior_mean,
    posterior_mean_network,
    sample_forward,
    sample_network,
)
from bbb_lightning.bayes.forward_pass import KLRecord


class Custom(nn.Module):
    """Embedding + Linear + LayerNorm + a raw parameter: one of each kind of tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.gain = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.fc(self.embed(tokens))) * self.gain


def custom() -> Custom:
    torch.manual_seed(0)
    net = Custom()
    with torch.no_grad():  # LayerNorm starts at ones/zeros: make it look trained
        net.norm.weight.normal_()
        net.norm.bias.normal_()
    return net


TOKENS = torch.tensor([[1, 2, 3], [4, 5, 9]])
ORIGINAL_NAMES = ["gain", "embed.weight", "fc.weight", "fc.bias", "norm.weight", "norm.bias"]


def test_every_parameter_gets_a_posterior() -> None:
    original = custom()
    values = {name: p.detach().clone() for name, p in original.named_parameters()}
    assert sorted(values) == sorted(ORIGINAL_NAMES)
    net = bayesianize(custom())

    posteriors = dict(named_posteriors(net))
    assert sorted(posteriors) == sorted(ORIGINAL_NAMES)
    assert list(all_posteriors(net)) == list(posteriors.values())  # the same, in the same order
    shared = nn.Sequential(net.fc, nn.ReLU(), net.fc)  # a module reached twice counts once
    assert list(all_posteriors(shared)) == [q for _, q in named_posteriors(shared)]
    assert len(list(all_posteriors(shared))) == 2
    assert isinstance(net.fc, BayesianLinear)
    for module in (net, net.embed, net.norm):
        assert parametrize.is_parametrized(module)
    # Trainable tensors are the variational parameters, two per original tensor.
    trainable = [name for name, _ in net.named_parameters()]
    assert len(trainable) == 2 * len(ORIGINAL_NAMES)
    assert all(name.endswith((".mu", ".rho")) for name in trainable)
    # The values become the posterior means.
    for name, q in posteriors.items():
        assert torch.equal(q.mean, values[name]), name
    assert is_bayesian(net) and not is_bayesian(original)


def test_pretrained_start_posterior_mean_is_the_original_network() -> None:
    original = custom()
    expected = original(TOKENS)
    net = bayesianize(custom())
    assert torch.equal(posterior_mean_network(net)(TOKENS), expected)
    with posterior_mean(net):
        assert torch.equal(net(TOKENS), expected)
    assert not torch.equal(net(TOKENS), expected)  # a draw from q is not the mean


def test_include_globs() -> None:
    net = bayesianize(custom(), include=["fc.*"])
    assert [name for name, _ in named_posteriors(net)] == ["fc.weight", "fc.bias"]
    assert not parametrize.is_parametrized(net.norm)
    assert isinstance(net.norm.weight, nn.Parameter)


def test_exclude_globs() -> None:
    net = bayesianize(custom(), exclude=["*.bias", "gain"])
    assert sorted(name for name, _ in named_posteriors(net)) == [
        "embed.weight",
        "fc.weight",
        "norm.weight",
    ]
    # fc stays a Bayesian layer with a deterministic bias, still trainable.
    assert isinstance(net.fc, BayesianLinear) and net.fc.bias_posterior is None
    names = dict(net.named_parameters())
    assert {"fc.bias", "norm.bias", "gain"} <= set(names)
    assert torch.equal(names["fc.bias"], custom().fc.bias)


def test_bias_only_leaves_the_layer_plain_with_a_parametrized_bias() -> None:
    net = bayesianize(custom(), include=["fc.bias"])
    assert [name for name, _ in named_posteriors(net)] == ["fc.bias"]
    assert isinstance(net.fc, nn.Linear) and not isinstance(net.fc, BayesianLayer)
    assert parametrize.is_parametrized(net.fc, "bias")


class Tied(nn.Module):
    """An autoencoder whose decoder reuses the encoder's weight (``decoder.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.decoder = nn.Linear(3, 3)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(torch.tanh(self.encoder(x)))


def test_a_tied_tensor_gets_one_posterior_drawn_once_per_pass_and_counted_once() -> None:
    torch.manual_seed(0)
    net = bayesianize(Tied())
    shared = net.encoder.parametrizations.weight[0]
    assert net.decoder.parametrizations.weight[0] is shared
    assert [name for name, _ in named_posteriors(net)] == [
        "encoder.weight",
        "encoder.bias",
        "decoder.bias",
    ]
    expected = sum(posterior_kl(q) for _, q in named_posteriors(net))
    torch.testing.assert_close(kl_divergence(net), expected)  # the tied tensor once
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: seen.append(m.weight))
        for m in (net.encoder, net.decoder)
    ]
    net(torch.randn(2, 3)).sum().backward()
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen[0], seen[1])  # one draw for both names in one pass
    assert not torch.equal(net.encoder.weight, net.encoder.weight)  # a new draw outside one
    assert shared.mu.grad is not None and shared.mu.grad.abs().sum() > 0
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sum(p is shared.mu for p in trainable) == 1  # one tensor for the optimizer
    for plain in (sample_network(net), posterior_mean_network(net)):  # still tied, one value
        assert plain.encoder.weight is plain.decoder.weight
        assert isinstance(plain.encoder.weight, nn.Parameter)


def test_a_tied_tensor_is_selected_by_all_its_names_or_none() -> None:
    for exclude in (["encoder.weight"], ["decoder.weight"]):  # one name: it would be untied
        with pytest.raises(ValueError, match=r"select all of them .* or exclude all of them"):
            bayesianize(Tied(), exclude=exclude)
    # Every name left out: the tensor stays deterministic and shared, the rest is variational.
    net = bayesianize(Tied(), exclude=["encoder.weight", "decoder.weight"])
    assert net.encoder.weight is net.decoder.weight
    assert isinstance(net.encoder.weight, nn.Parameter)
    assert [name for name, _ in named_posteriors(net)] == ["encoder.bias", "decoder.bias"]


def test_one_module_in_two_places_stays_one_bayesian_layer() -> None:
    shared = nn.Linear(3, 3)
    net = bayesianize(nn.Sequential(shared, nn.Tanh(), shared))
    assert isinstance(net[0], BayesianLinear) and net[2] is net[0]
    assert [name for name, _ in named_posteriors(net)] == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match=r"'0\.weight', '2\.weight' are tied"):
        bayesianize(nn.Sequential(shared, nn.Tanh(), shared), exclude=["0.*"])


def test_bayesianize_twice_raises() -> None:
    net = bayesianize(custom())
    with pytest.raises(ValueError, match="already"):
        bayesianize(net)


def test_sequential() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Conv1d(1, 2, 3), nn.Flatten())
    net = bayesianize(copy.deepcopy(plain))
    assert [name for name, _ in named_posteriors(net)] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    assert all(isinstance(net[i], BayesianLayer) for i in (0, 2))
    x = torch.randn(5, 1, 4)
    assert net(x).shape == plain(x).shape == (5, 12)
    assert torch.equal(posterior_mean_network(net)(x), plain(x))


def test_bare_root_layer_is_parametrized() -> None:
    net = bayesianize(nn.Linear(3, 2))
    assert [name for name, _ in named_posteriors(net)] == ["weight", "bias"]
    assert parametrize.is_parametrized(net)
    assert net(torch.randn(4, 3)).shape == (4, 2)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    source = bayesianize(custom())
    with torch.no_grad():  # move away from the initial state
        for _, q in named_posteriors(source):
            q.mu.add_(0.1 * torch.randn_like(q.mu))
            q.rho.uniform_(-3.0, -1.0)
    torch.save(source.state_dict(), tmp_path / "bnn.pt")

    torch.manual_seed(123)  # a fresh copy with other values everywhere
    target = bayesianize(Custom())
    target.load_state_dict(torch.load(tmp_path / "bnn.pt", weights_only=True))

    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = source(TOKENS)
        torch.manual_seed(seed)
        assert torch.equal(target(TOKENS), expected)
    torch.testing.assert_close(kl_divergence(target), kl_divergence(source), rtol=0, atol=0)


def test_to_float64() -> None:
    net = bayesianize(custom()).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert all(b.dtype == torch.float64 for b in net.buffers())
    assert net(TOKENS).dtype == torch.float64
    assert kl_divergence(net).dtype == torch.float64

    seq = bayesianize(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)), estimator="flipout")
    seq.to(torch.float64)
    assert sample_forward(seq, torch.randn(4, 3, dtype=torch.float64), 5).dtype == torch.float64


def test_deepcopy_is_independent() -> None:
    net = bayesianize(custom())
    net(TOKENS).sum().backward()  # leaves remembered draws (autograd graph) behind
    clone = copy.deepcopy(net)

    with torch.no_grad():
        for _, q in named_posteriors(clone):
            q.mu.add_(1.0)
    with posterior_mean(net):
        expected = net(TOKENS)
    assert torch.equal(posterior_mean_network(net)(TOKENS), expected)
    with posterior_mean(clone):
        assert not torch.equal(clone(TOKENS), expected)
    for (name, q), (_, q_clone) in zip(named_posteriors(net), named_posteriors(clone), strict=True):
        assert q is not q_clone and q.mu is not q_clone.mu, name
        assert not torch.equal(q.mu, q_clone.mu)

    # Materialising the copy leaves the original (which shares the parametrized classes) intact.
    plain = sample_network(clone)
    assert plain(TOKENS).shape == (2, 3, 3)
    assert sorted(name for name, _ in named_posteriors(net)) == sorted(ORIGINAL_NAMES)
    assert parametrize.is_parametrized(net.norm) and parametrize.is_parametrized(clone.norm)
    for model in (net, clone):
        torch.manual_seed(0)
        first = model(TOKENS)
        torch.manual_seed(1)
        assert not torch.equal(model(TOKENS), first)
    with posterior_mean(net):
        assert torch.equal(net(TOKENS), expected)


class ReadsTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.w - self.w, self.w * x


def test_a_tensor_read_twice_in_one_forward_is_one_draw() -> None:
    net = bayesianize(ReadsTwice())
    q = dict(named_posteriors(net))["w"]
    x = torch.ones(5)
    record = KLRecord()
    with net.bayes_forward_pass.recording(record):
        difference, used = net(x)
    assert torch.equal(difference, torch.zeros(5))
    drawn = record.sample(q)
    assert drawn.shape == (1, 5)  # one draw, recorded once
    assert torch.equal(used, drawn[0])  # the KL sees the draw the forward used
    assert not torch.equal(drawn[0], q.mu)
    # Outside a forward of the root there is no cache: each read is a new draw.
    assert not torch.equal(net.w - net.w, torch.zeros(5))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = ReadsTwice()

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)[0]

    outer = bayesianize(Outer())
    assert torch.equal(outer(x), torch.zeros(5))


def test_posteriors_are_modules_with_their_prior() -> None:
    net = bayesianize(custom())
    for _, q in named_posteriors(net):
        assert isinstance(q, VariationalPosterior)
        assert q.prior is not None


@pytest.mark.parametrize(
    ("include", "exclude", "message"),
    [
        (["fc.*"], None, r"^include pattern 'fc\.\*' matches none of the parameters: 0\.weight"),
        (None, ["2.*"], r"^exclude pattern '2\.\*' matches none of the parameters"),
        ("0.weight", None, r"^include must be a list of glob patterns, got the string '0\.weight'"),
        (None, ["*"], r"leave no parameter variational"),
    ],
)
def test_include_and_exclude_patterns_that_would_change_the_model_silently_are_refused(
    include, exclude, message
) -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=message):
        bayesianize(net, include=include, exclude=exclude)
    with pytest.raises(ValueError, match="the network has none"):
        bayesianize(nn.ReLU())


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: GaussianPrior(loc=float("nan")), ValueError, "prior loc must be finite"),
        (
            lambda: MeanFieldNormal(torch.zeros(3), GaussianPrior(), rho_init=float("inf")),
            ValueError,
            "rho_init must be finite",
        ),
        (
            lambda: MeanFieldNormal(torch.zeros(3), GaussianPrior(), min_scale=float("nan")),
            ValueError,
            "min_scale must be a finite number >= 0",
        ),
        *(  # a string was iterated ('must be real number, not str': no key, no value)
            (
                lambda rho_init=rho_init: MeanFieldNormal(
                    torch.zeros(3), GaussianPrior(), rho_init=rho_init
                ),
                ValueError,
                rf"^posterior rho_init must be a number or \[low, high\] with low <= high, got "
                rf"{re.escape(repr(rho_init))}$",
            )
            for rho_init in ("abc", ["a", "b"], None, True)
        ),
        (
            lambda: MeanFieldNormal(torch.zeros(3), GaussianPrior(), min_scale="abc"),
            ValueError,
            r"^posterior min_scale must be a finite number >= 0, got 'abc'$",
        ),
        (
            lambda: bayesianize(nn.Linear(2, 1), prior="gaussian"),
            TypeError,
            "prior must be a Prior",
        ),
        (
            lambda: sample_forward(bayesianize(nn.Linear(2, 1)), torch.zeros(2, 2), True),
            ValueError,
            "num_samples must be an integer >= 1, got True",
        ),
    ],
)
def test_bad_arguments_are_named_instead_of_becoming_nan(make, error, message) -> None:
    with pytest.raises(error, match=message):
        make()


def test_a_posterior_that_is_not_callable_and_a_layer_of_another_type_are_named() -> None:
    with pytest.raises(TypeError, match=r"^posterior must be a callable .* got 'MeanFieldNormal'$"):
        bayesianize(nn.Linear(3, 2), posterior="MeanFieldNormal")
    with pytest.raises(TypeError, match=r"^BayesianLinear.from_module needs an nn.Linear, got Con"):
        BayesianLinear.from_module(nn.Conv2d(1, 2, 3), GaussianPrior())


# Transformers: ``nn.TransformerEncoderLayer.forward`` reads ``self.linear1.weight`` (and
# ``linear2``, ``norm*``, ``self_attn.out_proj``) for its eval fast path, and
# ``nn.TransformerEncoder.forward`` reads ``first_layer.linear1.weight``: a Bayesian layer answers
# with the draw of the pass. (A bare layer hid the defect: the root's hooks turn the fast path
# off, so the layers below are wrapped.)
D_MODEL = 16


def encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(D_MODEL, 2, dim_feedforward=32, batch_first=True)


class WithMemory(nn.Module):
    """A decoder (layer) or a whole transformer, its input its own memory: one argument."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x, x)


TRANSFORMERS = {
    "encoder layer": encoder_layer,
    "encoder layer in a Sequential": lambda: nn.Sequential(encoder_layer()),
    "encoder": lambda: nn.TransformerEncoder(encoder_layer(), 2, enable_nested_tensor=False),
    "decoder layer": lambda: WithMemory(
        nn.TransformerDecoderLayer(D_MODEL, 2, dim_feedforward=32, batch_first=True)
    ),
    "transformer": lambda: WithMemory(
        nn.Transformer(D_MODEL, 2, 1, 1, dim_feedforward=32, batch_first=True)
    ),
}
GRAD_MODES = {
    "grad": torch.enable_grad,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


def transformer(kind: str) -> tuple[nn.Module, nn.Module]:
    """The plain module and a Bayesian copy of it."""
    torch.manual_seed(0)
    plain = TRANSFORMERS[kind]()
    return plain, bayesianize(copy.deepcopy(plain))


@pytest.mark.parametrize("kind", TRANSFORMERS)
def test_transformers_sample_in_eval_mode_under_every_grad_mode(kind: str) -> None:
    plain, net = transformer(kind)
    plain.eval()
    net.eval()
    x = torch.randn(4, 5, D_MODEL)
    for mode, context in GRAD_MODES.items():
        with context():
            out = sample_forward(net, x, 3)
            single = net(x)
        assert out.shape == (3, 4, 5, D_MODEL), mode
        assert single.shape == (4, 5, D_MODEL), mode
        assert torch.isfinite(out).all() and torch.isfinite(single).all(), mode
        assert not torch.equal(out[0], out[1]), mode  # every sample is a draw of its own
    with torch.no_grad():  # two eval draws differ
        assert not torch.equal(net(x), net(x))
    for context in GRAD_MODES.values():  # the fast path, where taken, uses the mean right
        with posterior_mean(net), context():
            torch.testing.assert_close(net(x), plain(x))


@pytest.mark.parametrize("kind", TRANSFORMERS)
def test_transformers_give_every_parameter_one_posterior_and_train(kind: str) -> None:
    plain, net = transformer(kind)
    names = [name for name, _ in plain.named_parameters()]
    posteriors = dict(named_posteriors(net))
    assert sorted(posteriors) == sorted(names)
    assert len(list(all_posteriors(net))) == len(names)
    expected_kl = sum(posterior_kl(q) for q in posteriors.values())
    torch.testing.assert_close(kl_divergence(net), expected_kl)  # each tensor counted once
    # Every feed-forward layer becomes a Bayesian layer, also the encoder's, whose weights its
    # eval fast path reads (``self.linear1.weight``): a Bayesian layer answers ``.weight``.
    layers = {n: m for n, m in net.named_modules() if n.endswith(("linear1", "linear2"))}
    assert layers
    for name, module in layers.items():
        assert isinstance(module, BayesianLinear), name

    net.train()
    x = torch.randn(4, 5, D_MODEL)
    loss = sample_forward(net, x, 2).square().mean()
    loss.backward()
    for name, q in posteriors.items():
        for tensor in (q.mu, q.rho):
            assert tensor.grad is not None, name
            assert torch.isfinite(tensor.grad).all(), name
            assert tensor.grad.abs().sum() > 0, name


class ReadsTheWeight(nn.Module):
    """Ties its output to a layer's weight: ``F.linear(h, self.fc.weight)`` in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)
        nn.init.zeros_(self.head.bias)  # construction only: ``head`` may still be swapped

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.linear(torch.relu(self.fc(x)), self.fc.weight.t()))


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_a_layer_whose_weight_its_parent_reads_applies_the_weight_read(estimator: str) -> None:
    torch.manual_seed(0)
    plain = ReadsTheWeight()
    net = bayesianize(copy.deepcopy(plain), estimator=estimator)
    assert isinstance(net.fc, BayesianLinear) and isinstance(net.head, BayesianLinear)
    assert sorted(name for name, _ in named_posteriors(net)) == sorted(
        name for name, _ in plain.named_parameters()
    )
    x = torch.randn(3, 4)
    with posterior_mean(net):
        torch.testing.assert_close(net(x), plain(x))

    # In one pass every read of fc.weight is the weight fc applies: the same network as the
    # plain one with W := that draw (fc applied first, then read, under weight
    # reparameterization; read first under the other two would be needed to share it).
    captured = {}

    def capture(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        captured["weight"], captured["bias"] = module.weight, module.bias
        captured["out"] = out

    hook = net.fc.register_forward_hook(capture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # local/flipout: the read after use is warned
        net(x)
    hook.remove()
    if estimator == "reparameterization":
        expected = nn.functional.linear(x, captured["weight"], captured["bias"])
        torch.testing.assert_close(captured["out"], expected)
    # Several samples: the network reads a weight, so they run one call each, every one a draw.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # local/flipout: the read after use is warned
        out = sample_forward(net, x, 2)
    assert out.shape == (2, 3, 4) and not torch.equal(out[0], out[1])
    assert net.bayes_forward_pass.reads_weights_in_fold


def test_a_weight_read_after_the_layer_ran_under_local_reparameterization_is_warned() -> None:
    net = bayesianize(ReadsTheWeight(), estimator="local")
    with pytest.warns(UserWarning, match="read after the layer was applied"):
        net(torch.randn(3, 4))


def test_bayesian_layers_answer_weight_and_bias() -> None:
    torch.manual_seed(0)
    layer = bayesianize(nn.Sequential(nn.Linear(4, 3))).get_submodule("0")
    assert layer.weight.shape == (3, 4) and layer.bias.shape == (3,)
    assert not torch.equal(layer.weight, layer.weight)  # outside a pass: a new draw each read
    with posterior_mean(layer):
        torch.testing.assert_close(layer.weight, layer.weight_posterior.mean)
    plain_bias = bayesianize(nn.Sequential(nn.Linear(4, 3)), exclude=["0.bias"])[0]
    assert isinstance(plain_bias.bias, nn.Parameter)  # a deterministic bias is the parameter
    assert bayesianize(nn.Sequential(nn.Linear(4, 3, bias=False)))[0].bias is None
