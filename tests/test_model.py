import pytest
import torch
import torch.nn.functional as F

from gptlab.config import ModelConfig
from gptlab.model import GPT

ARCHES = [
    dict(arch="modern"),
    dict(arch="gpt2"),
    dict(arch="modern", n_kv_head=1, qk_norm=True),
    dict(arch="modern", parallel_block=True),
    dict(arch="gpt2", parallel_block=True),
    dict(arch="modern", mlp="relu2", logit_softcap=15.0, zero_init_out=True),
]


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_embd=32), **kw})
    return GPT(cfg).eval()


@pytest.mark.parametrize("kw", ARCHES)
def test_future_tokens_never_change_earlier_logits(kw):
    model = tiny(**kw)
    x = torch.randint(0, 50, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def assert_cached_matches_full(model: GPT) -> None:
    """A prompt of 9 tokens then 11 one at a time through the KV cache give the full forward's logits."""
    x = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3)
        parts = [model(x[:, :9], cache=cache)]
        cache.advance(9)
        for t in range(9, 20):
            parts.append(model(x[:, t : t + 1], cache=cache))
            cache.advance(1)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", ARCHES)
def test_cached_forward_matches_full_forward(kw):
    assert_cached_matches_full(tiny(**kw))


def test_cache_rows_of_different_lengths():
    """Rows prefilled right-padded then decoded together match each row run alone."""
    model = tiny()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 4))
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0], padded[1, :4] = a[0], b[0]
    with torch.no_grad():
        cache = model.new_cache(2)
        model(padded, cache=cache)
        cache.lengths.copy_(torch.tensor([7, 4]))
        nxt = torch.tensor([[3], [5]])
        step = model(nxt, cache=cache)[:, -1]
        alone_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        alone_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    torch.testing.assert_close(step, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=1e-5)


def test_gpt2_ties_head_and_scales_residual_init():
    model = tiny(arch="gpt2")
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.pos_emb is not None and model.blocks[0].attn.q.bias is not None
    modern = tiny(arch="modern", n_layer=8)
    assert modern.lm_head.weight is not modern.tok_emb.weight and modern.blocks[0].attn.q.bias is None
    std = modern.blocks[0].attn.out.weight.std().item()
    assert std == pytest.approx(0.02 / 4, rel=0.15)  # 0.02 / sqrt(2 * 8)


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_a_parallel_block_adds_attention_and_mlp_of_one_shared_norm(arch):
    model = tiny(arch=arch, parallel_block=True)
    block = model.blocks[0]
    assert not hasattr(block, "norm2") and not any("norm2" in name for name in model.state_dict())
    x = torch.randn(2, 5, 32)
    rope = None if model.pos_emb is not None else (model.rope_cos[:5, None], model.rope_sin[:5, None])
    with torch.no_grad():
        h = block.norm1(x)
        expected = x + block.attn(h, rope, None, None, 0) + block.mlp(h)
        assert torch.equal(block(x, rope, None, None, 0), expected)
        # the same weights in a sequential block (norm2 = norm1) compute something else
        sequential = tiny(arch=arch)
        sequential.load_state_dict(
            {**model.state_dict(), **{k.replace("norm1", "norm2"): v for k, v in model.state_dict().items()}}
        )
        idx = torch.randint(0, 50, (2, 12))
        assert not torch.allclose(model(idx), sequential(idx))


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than the context of 24"):
        tiny()(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_a_relu2_mlp_is_down_of_relu_squared_without_a_gate(arch):
    model = tiny(arch=arch, mlp="relu2")
    mlp = model.blocks[0].mlp
    assert not hasattr(mlp, "gate") and mlp.fc.weight.shape == (128, 32)  # no gate, 4 * n_embd wide as gelu's
    x = torch.randn(2, 5, 32, requires_grad=True)
    expected = mlp.down(torch.relu(mlp.fc(x)) ** 2)
    assert torch.equal(mlp(x), expected)
    mlp(x).sum().backward()
    assert x.grad.abs().sum() > 0 and mlp.fc.weight.grad.abs().sum() > 0
    assert model.num_params() == tiny(arch=arch, mlp="gelu").num_params()  # equal parameters and FLOPs


def test_logit_softcap_squashes_logits_smoothly_into_the_cap():
    capped, plain = tiny(logit_softcap=2.0), tiny()
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():  # weights large enough that some logits pass the cap
        for m in (capped, plain):
            m.lm_head.weight.mul_(20)
    x = torch.randint(0, 50, (2, 12))
    raw, got = plain(x), capped(x)
    assert raw.abs().max() > 4 and got.abs().max() <= 2  # (tanh rounds to 1 in fp32 far out)
    torch.testing.assert_close(got, 2.0 * torch.tanh(raw / 2.0))
    capped.train()
    torch.nn.functional.cross_entropy(capped(x).flatten(0, 1), x.flatten()).backward()
    assert capped.lm_head.weight.grad.abs().sum() > 0


def test_zero_init_out_starts_every_block_as_the_identity():
    model = tiny(zero_init_out=True)
    for block in model.blocks:
        assert not block.attn.out.weight.any() and not block.mlp.down.weight.any()
        assert block.attn.q.weight.std() > 0.01 and block.mlp.up.weight.std() > 0.01
    x = torch.randn(2, 5, 32)
    rope = (model.rope_cos[:5, None], model.rope_sin[:5, None])
    with torch.no_grad():
        assert torch.equal(model.blocks[0](x, rope, None, None, 0), x)
    model.train()
    idx = torch.randint(0, 50, (2, 12))
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    assert model.blocks[0].mlp.down.weight.grad.abs().sum() > 0  # zero weights still learn


def randomized(model: GPT) -> GPT:
    """`model` with its x0/residual lambdas and value embeddings (where it has them) set to random nonzero values."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("resid_lambdas", "x0_lambdas")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("value_embed.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("switch", ["x0_lambdas", "value_embeds"])
def test_x0_lambdas_and_value_embeds_change_nothing_at_init(switch):
    model, plain = tiny(n_kv_head=2, **{switch: True}), tiny(n_kv_head=2)  # the same seed
    state, new = model.state_dict(), set(model.state_dict()) - set(plain.state_dict())
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())  # they draw nothing from the RNG
    added = {"x0_lambdas": {"resid_lambdas", "x0_lambdas"}, "value_embeds": {"blocks.0.attn.value_embed.weight",
             "blocks.1.attn.value_embed.weight"}}  # fmt: skip
    assert new == added[switch]
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_x0_lambdas_mix_the_embedding_into_each_block_s_input():
    model = tiny(x0_lambdas=True)
    assert torch.equal(model.resid_lambdas, torch.ones(2)) and torch.equal(model.x0_lambdas, torch.zeros(2))
    randomized(model)
    idx = torch.randint(0, 50, (2, 12))
    rope = (model.rope_cos[:12, None], model.rope_sin[:12, None])
    with torch.no_grad():
        x = x0 = model.tok_emb(idx)
        for i, block in enumerate(model.blocks):
            x = block(model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0, rope, None, None, i)
        torch.testing.assert_close(model(idx), model.lm_head(model.norm_f(x)), rtol=0, atol=0)
    model.train()
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    for p in (model.resid_lambdas, model.x0_lambdas):
        assert p.grad.shape == (2,) and p.grad.isfinite().all() and p.grad.ne(0).all()
    model.reset_parameters()
    assert torch.equal(model.resid_lambdas, torch.ones(2)) and torch.equal(model.x0_lambdas, torch.zeros(2))


def test_value_embeds_add_each_layer_s_own_token_rows_to_the_values():
    model = tiny(value_embeds=True, n_kv_head=2)  # 4 query heads share 2 value heads of 8
    attn = model.blocks[1].attn
    assert attn.value_embed.weight.shape == (50, 16) and not attn.value_embed.weight.any()
    randomized(model)
    idx, x = torch.randint(0, 50, (2, 12)), torch.randn(2, 12, 32)
    rope = (model.rope_cos[:12, None], model.rope_sin[:12, None])
    with torch.no_grad():
        q, k = attn.q(x).view(2, 12, 4, 8), attn.k(x).view(2, 12, 2, 8)
        q, k = (t * rope[0] + torch.cat((-t[..., 4:], t[..., :4]), -1) * rope[1] for t in (q, k))
        v = attn.v(x).view(2, 12, 2, 8) + attn.value_embed.weight[idx].view(2, 12, 2, 8)
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True)
        torch.testing.assert_close(attn(x, rope, None, None, 1, idx), attn.out(y.transpose(1, 2).reshape(2, 12, 32)))
    # value embeddings are lookups: counted with the embeddings, as the position table is
    plain = tiny(n_kv_head=2)
    assert model.num_params() == plain.num_params()
    assert model.num_params(non_embedding=False) == plain.num_params(non_embedding=False) + 2 * 50 * 16
    model.train()
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    used = torch.zeros(50, dtype=torch.bool)
    used[idx.flatten()] = True
    for block in model.blocks:
        grad = block.attn.value_embed.weight.grad
        assert grad.isfinite().all() and grad[used].abs().sum(1).gt(0).all() and not grad[~used].any()
    model.reset_parameters()
    assert not any(block.attn.value_embed.weight.any() for block in model.blocks)


@pytest.mark.parametrize(
    "switches",
    [
        dict(x0_lambdas=True),
        dict(value_embeds=True, n_kv_head=1),
        dict(arch="gpt2", x0_lambdas=True, value_embeds=True),
    ],
)
def test_cached_forward_matches_full_forward_with_x0_lambdas_and_value_embeds(switches):
    assert_cached_matches_full(randomized(tiny(**switches)))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_lambdas_and_value_embeds_train_on_adamw_in_their_kinds_groups(optimizer):
    from gptlab.config import TrainConfig
    from gptlab.train.optim import build_optimizers, param_kind

    model = tiny(x0_lambdas=True, value_embeds=True)
    assert param_kind("blocks.0.attn.value_embed.weight", 2) == "embeddings"  # decayed as tok_emb is
    assert param_kind("resid_lambdas", 1) is None and param_kind("x0_lambdas", 1) is None  # never decayed
    optimizers = build_optimizers(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    adam = optimizers[-1]
    assert isinstance(adam, torch.optim.AdamW)
    decayed, plain = ({id(p) for p in g["params"]} for g in adam.param_groups)
    assert [g["weight_decay"] for g in adam.param_groups] == [0.1, 0.0]
    assert {id(b.attn.value_embed.weight) for b in model.blocks} <= decayed
    assert {id(model.resid_lambdas), id(model.x0_lambdas)} <= plain
    if optimizer == "muon":  # the blocks' linear weights only: not their value embeddings
        muon = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
        assert muon == {
            id(p)
            for n, p in model.named_parameters()
            if n.startswith("blocks.")
            and n.endswith(
                ("q.weight", "k.weight", "v.weight", "out.weight", "gate.weight", "up.weight", "down.weight")
            )
        }


def test_bad_new_switches_are_user_errors():
    from gptlab.errors import GptlabError

    with pytest.raises(GptlabError, match=r"model.logit_softcap must be positive or 0 \(off\), got -1.0"):
        tiny(logit_softcap=-1.0)
    with pytest.raises(GptlabError, match="relu2"):  # the choices listed
        tiny(mlp="relu3")
