"""Real modules made Bayesian: tied weights (GPT-2), a cache among the outputs, Hugging Face's
embedding methods, recurrent layers deep-copied after a forward, the old hook-based weight norm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrize
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from bbb_lightning.bayes import (
    BayesianLinear,
    bayesianize,
    kl_divergence,
    named_posteriors,
    posterior_mean,
    sample_forward,
    sample_forward_with_kl,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def gpt2(**overrides: object) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
        bos_token_id=0, eos_token_id=0, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def closed_form_kl(net: nn.Module) -> torch.Tensor:
    """KL(q || p) of every distinct posterior, from torch.distributions in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for _, q in named_posteriors(net):
        sigma = torch.nn.functional.softplus(q.rho.double())
        prior = Normal(q.prior.loc.double(), q.prior.scale.double())
        total = total + torch_kl(Normal(q.mu.double(), sigma), prior).sum()
    return total


def test_gpt2_tied_embeddings_get_one_posterior_whose_kl_counts_once() -> None:
    plain = gpt2()
    assert plain.lm_head.weight is plain.transformer.wte.weight  # tie_word_embeddings=True
    net = bayesianize(copy.deepcopy(plain))
    wte_q = net.transformer.wte.parametrizations.weight[0]
    assert net.lm_head.parametrizations.weight[0] is wte_q
    names = [name for name, _ in named_posteriors(net)]
    assert names == [name for name, _ in plain.named_parameters()]  # lm_head.weight: once
    torch.testing.assert_close(kl_divergence(net).double(), closed_form_kl(net))

    ids = torch.randint(0, 50, (2, 6))
    out, kl = sample_forward_with_kl(net, ids, 2)
    assert out.logits.shape == (2, 2, 6, 50)
    torch.testing.assert_close(kl.double(), closed_form_kl(net))
    (out.logits.logsumexp(-1).mean() + kl).backward()
    assert wte_q.mu.grad is not None and wte_q.mu.grad.abs().sum() > 0
    net.eval(), plain.eval()  # (no dropout)
    with posterior_mean(net):  # the posterior mean is the plain network, tied as it was
        torch.testing.assert_close(net(ids).logits, plain(ids).logits)


def test_gpt2_draws_the_tied_tensor_once_per_forward_pass() -> None:
    net = bayesianize(gpt2())
    seen = {}

    def read(key: str) -> object:
        def hook(module: nn.Module, *_: object) -> None:
            seen[key] = module.weight

        return hook

    net.transformer.wte.register_forward_hook(read("embedding"))
    net.lm_head.register_forward_pre_hook(read("head"))
    net(torch.randint(0, 50, (1, 4)))
    assert torch.equal(seen["embedding"], seen["head"])


def test_a_causal_lm_output_keeps_its_cache_beside_the_stacked_logits() -> None:
    net = bayesianize(gpt2())
    out = sample_forward(net, torch.randint(0, 50, (2, 5)), 3)
    assert out.logits.shape == (3, 2, 5, 50)
    assert not torch.equal(out.logits[0], out.logits[1])
    assert isinstance(out.past_key_values, transformers.DynamicCache)


def test_hugging_face_embedding_methods_after_bayesianize() -> None:
    net = bayesianize(gpt2())
    net.tie_weights()  # already tied: one posterior, kept
    assert net.lm_head.parametrizations.weight[0] is net.transformer.wte.parametrizations.weight[0]
    with pytest.raises(ValueError, match=r"^resize_token_embeddings\(\) after bayesianize .*"
                       r"call model.resize_token_embeddings\(n\) before bayesianize"):  # fmt: skip
        net.resize_token_embeddings(60)
    assert net.transformer.wte.weight.shape == (50, 16)  # nothing changed
    untied = bayesianize(gpt2(tie_word_embeddings=False))
    with pytest.raises(ValueError, match=r"^tie_weights\(\) after bayesianize would replace"):
        untied.tie_weights()
    # Deterministic embeddings (excluded): both work as before, the rest stays variational.
    excluded = bayesianize(gpt2(), exclude=["transformer.wte.weight", "lm_head.weight"])
    excluded.resize_token_embeddings(60)
    assert excluded.transformer.wte.weight.shape == (60, 16)
    assert excluded.lm_head.weight is excluded.transformer.wte.weight
    assert excluded(torch.randint(0, 60, (1, 3))).logits.shape == (1, 3, 60)
    # Resized before bayesianize: the new rows are variational.
    resized = gpt2()
    resized.resize_token_embeddings(60)
    bayesianize(resized)
    assert resized.transformer.wte.parametrizations.weight[0].mu.shape == (60, 16)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_a_recurrent_layer_deep_copies_after_a_forward(cell: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    net = bayesianize(nn.Sequential(cell(3, 4, batch_first=True)))
    x = torch.randn(2, 5, 3)
    out, _ = net(x)
    out.sum().backward()  # the step's graph still works after the hook detached the copies
    assert all(q.mu.grad is not None for _, q in named_posteriors(net))
    twin = copy.deepcopy(net)
    with posterior_mean(net), posterior_mean(twin):
        torch.testing.assert_close(twin(x)[0], net(x)[0])
    first, second = net(x)[0], net(x)[0]
    assert not torch.equal(first, second)  # each call still draws its own weights
    with posterior_mean(net):  # and reads them anew: the mean, twice, is one network
        assert torch.equal(net(x)[0], net(x)[0])


def test_the_old_weight_norm_keeps_g_and_v_as_its_variational_tensors() -> None:
    def build() -> nn.Module:  # (torch cannot deep-copy a module under the old weight norm)
        torch.manual_seed(0)
        with pytest.warns(FutureWarning, match="weight_norm"):
            normed = nn.utils.weight_norm(nn.Linear(3, 4))
        return nn.Sequential(normed, nn.Tanh(), nn.Linear(4, 2))

    plain, net = build(), bayesianize(build())
    assert sorted(name for name, _ in named_posteriors(net)) == sorted(
        ["0.weight_g", "0.weight_v", "0.bias", "2.weight", "2.bias"]
    )
    assert isinstance(net[2], BayesianLinear)  # a layer without hooks is still swapped
    x = torch.randn(5, 3)
    net(x).sum().backward()
    for name in ("weight_g", "weight_v"):
        assert net[0].parametrizations[name][0].mu.grad.abs().sum() > 0, name
    with posterior_mean(net):  # g * v / |v| from the means: the plain network
        torch.testing.assert_close(net(x), plain(x))


def test_a_pruned_layer_keeps_its_mask_over_the_drawn_weights() -> None:
    layer = nn.Linear(6, 4)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    net = bayesianize(nn.Sequential(layer))
    assert [name for name, _ in named_posteriors(net)] == ["0.bias", "0.weight_orig"]
    net(torch.randn(2, 6))
    assert int((net[0].weight == 0).sum()) == 12  # half of 24 weights stay pruned


def test_torchs_parametrize_tools_work_on_a_posterior() -> None:
    torch.manual_seed(0)
    net = bayesianize(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    norm = net[1]
    assert parametrize.is_parametrized(norm, "weight")
    assert parametrize.type_before_parametrizations(norm) is nn.LayerNorm
    with parametrize.cached():
        assert norm.weight is norm.weight  # one draw while cached
    twin = parametrize.transfer_parametrizations_and_params(norm, nn.LayerNorm(4))
    assert twin.parametrizations.weight[0] is norm.parametrizations.weight[0]
    kept = copy.deepcopy(norm)
    with posterior_mean(kept):
        parametrize.remove_parametrizations(kept, "weight", leave_parametrized=True)
    assert isinstance(kept.weight, nn.Parameter)
    torch.testing.assert_close(kept.weight, norm.parametrizations.weight[0].mu)
