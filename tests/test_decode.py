import pytest
import torch
import torch.nn.functional as F
from conftest import scaled_model
from test_model import randomized

from gptlab.decode import Decoder, _packed_linear
from gptlab.generate import Engine, Generator, SamplingParams
from gptlab.lora import add_lora, merge_lora
from gptlab.model import GPT

SWITCHES = {
    "modern": dict(arch="modern"),
    "gpt2": dict(arch="gpt2"),
    "gqa+qk_norm": dict(n_head=4, n_kv_head=2, qk_norm=True),
    "gpt2+qk_norm+rope": dict(arch="gpt2", qk_norm=True, position="rope"),
    "gelu_exact+untied+bias": dict(mlp="gelu_exact", tie_embeddings=False, bias=True),
    "swiglu+learned+layernorm": dict(position="learned", norm="layernorm"),
    "parallel": dict(parallel_block=True),
    "gpt2+parallel+gqa": dict(arch="gpt2", parallel_block=True, n_head=4, n_kv_head=2),
    "relu2+softcap": dict(mlp="relu2", logit_softcap=15.0),
    "gpt2+relu2+softcap+zero_init_out": dict(arch="gpt2", mlp="relu2", logit_softcap=30.0, zero_init_out=True),
    "x0_lambdas": dict(x0_lambdas=True),
    "gqa+value_embeds": dict(n_head=4, n_kv_head=2, value_embeds=True),
    "gpt2+x0_lambdas+value_embeds": dict(arch="gpt2", x0_lambdas=True, value_embeds=True),
}


def switched(**switches: object) -> GPT:
    """conftest's scaled model, its x0/residual lambdas and value embeddings (if any) random, not their init."""
    return randomized(scaled_model(block_size=16, **switches))


def decode_both(
    model: GPT, lengths: list[int], decoder: Decoder | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Logits of one decode step through GPT.forward and through a Decoder (by default a new one), from equal
    caches whose rows hold `lengths` tokens; and the two caches' keys and values after it."""
    g = torch.Generator().manual_seed(1)
    B, width = len(lengths), max(lengths)
    prompts = torch.randint(0, model.cfg.vocab_size, (B, width), generator=g)
    ids = torch.randint(0, model.cfg.vocab_size, (B,), generator=g)
    caches = [model.new_cache(B, model.cfg.block_size + 1) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:  # rows shorter than the widest write their padding past it, in the spare slot
            slots = torch.arange(width).expand(B, width)
            slots = torch.where(slots < torch.tensor(lengths)[:, None], slots, model.cfg.block_size)
            model(prompts, positions=slots, cache=cache)
            cache.advance(torch.tensor(lengths))
        forward = model(ids[:, None], cache=caches[0], last_only=True)[:, 0]
        decoder = decoder or Decoder(model)
        assert decoder.current()
        decoded = decoder(ids, caches[1])
    return forward, decoded, [caches[0].k, caches[1].k, caches[0].v, caches[1].v]


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
@pytest.mark.parametrize("lengths", [[5], [7, 7, 7], [3, 11, 1]], ids=["one row", "rows alike", "rows apart"])
def test_decoder_equals_the_model_forward_within_1e_5(switches, lengths):
    model = switched(**switches)
    forward, decoded, (k0, k1, v0, v1) = decode_both(model, lengths)
    assert forward.shape == decoded.shape == (len(lengths), model.cfg.vocab_size)
    assert torch.allclose(forward, decoded, atol=1e-5, rtol=0)
    assert torch.allclose(k0, k1, atol=1e-5, rtol=0) and torch.allclose(v0, v1, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "switches",
    ["gpt2+parallel+gqa", "gqa+qk_norm", "gelu_exact+untied+bias", "relu2+softcap", "gpt2+x0_lambdas+value_embeds"],
)
def test_compiled_decoder_equals_the_model_forward_within_1e_5(switches):
    model = switched(**SWITCHES[switches])
    decoder = Decoder(model, compile=True)  # one compilation for one row, one for several at any lengths
    for lengths in [5], [7, 7, 7], [3, 11, 1], [4, 9]:
        forward, decoded, (k0, k1, v0, v1) = decode_both(model, lengths, decoder)
        assert torch.allclose(forward, decoded, atol=1e-5, rtol=0)
        assert torch.allclose(k0, k1, atol=1e-5, rtol=0) and torch.allclose(v0, v1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("part", ["blocks.0.mlp.fc", "blocks.1.attn.out", "lm_head", "blocks.0.attn.k"])
def test_a_packed_decoder_sees_an_in_place_change_to_any_weight(part):
    model = scaled_model(block_size=16, arch="gpt2", tie_embeddings=False)
    decoder = Decoder(model)
    layer = decoder.layers[0]
    assert all(f.func is _packed_linear for f in (decoder.head, layer.qkv, layer.out, layer.up, layer.down))
    before, decoded, _ = decode_both(model, [5], decoder)
    assert torch.allclose(before, decoded, atol=1e-5, rtol=0)
    with torch.no_grad():  # the packed copy is stale: the decoder must gather (and pack) afresh
        model.get_submodule(part).weight.mul_(3)
    after, decoded, _ = decode_both(model, [5], decoder)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, decoded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_a_decoder_sees_in_place_changes_to_lambdas_and_value_embeds(packed, monkeypatch):
    if not packed:  # the decoder computes over the model's own tensors
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = switched(x0_lambdas=True, value_embeds=True)
    decoder = Decoder(model)
    assert (decoder.head.func is _packed_linear) == (packed and torch.backends.mkldnn.is_available())
    before, decoded, _ = decode_both(model, [3, 11, 1], decoder)
    assert torch.allclose(before, decoded, atol=1e-5, rtol=0)
    with torch.no_grad():
        model.x0_lambdas.add_(1.0)
        model.blocks[1].attn.value_embed.weight.mul_(-2.0)
    after, decoded, _ = decode_both(model, [3, 11, 1], decoder)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, decoded, atol=1e-5, rtol=0)


def test_without_onednn_the_decoder_computes_over_the_model_own_weights(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = scaled_model(block_size=16, tie_embeddings=False)
    decoder = Decoder(model)
    assert decoder.head.func is F.linear and decoder.head.keywords["weight"] is model.lm_head.weight
    assert decoder.layers[0].out.keywords["weight"] is model.blocks[0].attn.out.weight
    forward, decoded, _ = decode_both(model, [3, 11, 1], decoder)
    assert torch.allclose(forward, decoded, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_compiled_decoder_compiles_again_when_the_weights_change():
    model = scaled_model(block_size=16)
    decoder = Decoder(model, compile=True)
    before, decoded, _ = decode_both(model, [5], decoder)
    assert torch.allclose(before, decoded, atol=1e-5, rtol=0)
    first = decoder.compiled
    with torch.no_grad():  # an in-place change (a version bump): the frozen-in weights are stale
        model.blocks[0].mlp.down.weight.mul_(3)
    after, decoded, _ = decode_both(model, [5], decoder)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, decoded, atol=1e-5, rtol=0)
    assert decoder.compiled is not first


@pytest.mark.slow
def test_compiled_decoder_in_bfloat16_is_as_close_to_fp32_as_the_forward():
    model = scaled_model(block_size=16, arch="modern", n_head=4, n_kv_head=2)
    exact, _, _ = decode_both(model, [3, 11, 1])
    model = model.to(torch.bfloat16)
    forward, decoded, caches = decode_both(model, [3, 11, 1], Decoder(model, compile=True))
    assert decoded.dtype == torch.bfloat16 and caches[1].dtype == torch.bfloat16
    # inductor keeps a fused kernel's intermediates in fp32 where eager rounds each op's result to bf16: the
    # compiled step differs from the forward by bf16's rounding, and is no further from the fp32 model than it is
    forward_error, compiled_error = ((t.float() - exact).abs().max().item() for t in (forward, decoded))
    assert compiled_error <= 1.5 * forward_error, (compiled_error, forward_error)
    torch.testing.assert_close(decoded, forward, atol=0.05, rtol=0.05)
    torch.testing.assert_close(caches[1], caches[0], atol=0.05, rtol=0.05)


def test_a_model_built_elsewhere_does_not_make_the_decoder_gather_again():
    model = scaled_model(block_size=16)
    decoder = Decoder(model)
    layers, switches = decoder.layers, model.mode_switches
    scaled_model(block_size=16).eval().eval()  # another model's modules and parameters registered
    model.eval()  # already in eval mode: no switch
    assert model.mode_switches == switches
    assert decoder.current() and decoder.layers is layers
    down = model.blocks[0].mlp.down
    down.weight = torch.nn.Parameter(down.weight.detach() * 2)  # a parameter of its own replaced: gathered again
    forward, decoded, _ = decode_both(model, [5], decoder)
    assert decoder.layers is not layers
    assert torch.allclose(forward, decoded, atol=1e-5, rtol=0)


def test_a_model_with_some_stacked_layers_quantized_runs_its_forward():
    from gptlab.quantize import Int8Linear

    model = scaled_model(block_size=16)
    model.blocks[0].attn.k = Int8Linear.of(model.blocks[0].attn.k)  # q and v stay fp32: no one matmul for them
    assert not Decoder.covers(model)
    assert Engine(model).decoder is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_decoder_in_half_precision_equals_the_model_forward(arch, dtype):
    model = scaled_model(block_size=16, arch=arch).to(dtype)
    forward, decoded, caches = decode_both(model, [3, 11, 1])
    assert decoded.dtype == dtype and caches[1].dtype == dtype
    torch.testing.assert_close(decoded, forward)
    torch.testing.assert_close(caches[1], caches[0])


def test_decoder_takes_the_last_position_for_the_spare_slot_as_the_forward_does():
    model = scaled_model(block_size=8)
    forward, decoded, _ = decode_both(model, [8])  # the row's next slot is the spare one past the context
    assert torch.allclose(forward, decoded, atol=1e-5, rtol=0)


def test_decoder_overflowing_the_cache_is_refused():
    model = scaled_model(block_size=8)
    cache = model.new_cache(1, 8)
    cache.advance(8)
    with pytest.raises(ValueError, match=r"KV cache overflow: position 8 >= 8"):
        Decoder(model)(torch.tensor([1]), cache)


class Doubled(GPT):
    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return 2 * super().forward(*args, **kwargs)


class Embedded(GPT):
    def embed(self, idx, positions):  # noqa: ANN001, ANN201 - the forward stays GPT's own
        return 2 * super().embed(idx, positions)


def test_models_the_decoder_does_not_cover_run_their_own_forward():
    plain = scaled_model()
    assert Decoder.covers(plain)
    doubled = Doubled(plain.cfg).eval()
    doubled.load_state_dict(plain.state_dict())
    hooked, calls = scaled_model(), []
    hooked.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    adapted = scaled_model()
    add_lora(adapted, rank=2, alpha=4)
    adapted.eval()
    training = scaled_model(dropout=0.1).train()
    half_training = scaled_model(dropout=0.1)
    half_training.blocks[1].train()
    assert Decoder.covers(scaled_model().train())  # without dropout, training mode computes the same
    patched = scaled_model()
    patched.blocks[0].mlp.forward = lambda x: 0 * x
    embedded = Embedded(plain.cfg).eval()
    for model in (doubled, embedded, hooked, adapted, training, half_training, patched):
        assert not Decoder.covers(model)
        with pytest.raises(ValueError, match="this model needs its own forward"):
            Decoder(model)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert not Decoder.covers(plain)  # a global hook
    finally:
        handle.remove()
    assert Engine(plain).decoder is not None
    assert Engine(plain, use_cache=False).decoder is None
    # the engine runs these through forward: every step's forward shows (the hook fires once per step)
    engine = Engine(hooked)
    assert engine.decoder is None
    rid = engine.submit([1, 2, 3], 6, SamplingParams(temperature=0))
    while engine.has_work():
        engine.step()
    assert len(calls) == engine.forward_calls == 6 and rid == 0
    # the doubled logits pick the same greedy tokens, through forward at every step
    assert Generator(doubled).generate([[1, 2]], 5, temperature=0) == Generator(plain).generate(
        [[1, 2]], 5, temperature=0
    )


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    rid, out = engine.submit(prompt, n, SamplingParams(temperature=0)), []
    while engine.has_work():
        out += [t for u in engine.step() if u.id == rid for t in u.token_ids]
    return out


def changes(model: GPT) -> dict:
    """Ways the model changes under an engine built before; each returns nothing."""
    other = scaled_model(arch=model.cfg.arch)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)

    def fused_adamw_step() -> None:  # the fused kernel leaves the tensors' version counters alone
        opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
        model.train()
        model(torch.randint(0, 40, (2, 10))).sum().backward()
        opt.step()
        model.eval()

    def adapters(merge: bool) -> None:  # new LoRALinear modules, trained, then (maybe) plain nn.Linear ones again
        add_lora(model, rank=2, alpha=16)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
        model.train()
        model(torch.randint(0, 40, (2, 10))).sum().backward()
        opt.step()
        model.eval()
        if merge:
            merge_lora(model)

    def new_parameter() -> None:
        model.blocks[0].attn.q.weight = torch.nn.Parameter(-model.blocks[0].attn.q.weight.detach())

    return {
        "fused AdamW step in training mode": fused_adamw_step,
        "load_state_dict in eval mode": lambda: model.load_state_dict(other.state_dict()),
        "load_state_dict(assign=True)": lambda: model.load_state_dict(other.state_dict(), assign=True),
        "a parameter set anew": new_parameter,
        "LoRA adapters trained, then merged": lambda: adapters(merge=True),
        "LoRA adapters trained, not merged": lambda: adapters(merge=False),
        "to float64": lambda: model.to(torch.float64),
    }


CHANGES = list(changes(scaled_model()))


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
@pytest.mark.parametrize("change", CHANGES)
def test_an_engine_held_while_the_model_changes_decodes_with_the_model_as_it_is(arch, change):
    model = scaled_model(arch=arch)
    held = Engine(model)
    before = greedy(held, [1, 2], 8)
    changes(model)[change]()
    calls = held.forward_calls
    after = greedy(held, [1, 2], 8)
    assert after == greedy(Engine(model, use_cache=False), [1, 2], 8)
    if change != "to float64":  # new values, not just a wider type
        assert after != before
    uses_decoder = held.decoder.current()
    assert uses_decoder == ("not merged" not in change)  # adapted layers run through the forward
    if uses_decoder:
        assert held.decoder.layers[0].qkv.keywords["weight"].dtype == model.lm_head.weight.dtype  # gathered again
    assert held.forward_calls - calls == 8


def test_the_decoder_steps_aside_in_training_mode_and_under_autocast_and_comes_back():
    model = scaled_model(dropout=0.1)
    engine = Engine(model)
    assert engine.decoder.current()
    model.train()
    assert not engine.decoder.current()
    model.eval()
    assert engine.decoder.current()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not engine.decoder.current()
        greedy(engine, [1, 2], 3)  # through the forward, which autocast knows how to run


def test_a_model_made_in_inference_mode_decodes():
    with torch.inference_mode():
        model = scaled_model()
        assert Generator(model).generate([[1, 2]], 6, temperature=0) == Generator(model).generate(
            [[1, 2]], 6, temperature=0, use_cache=False
        )


def test_a_cached_forward_with_gradients_on_equals_one_without():
    model = scaled_model()
    prompts, ids = torch.randint(0, 40, (2, 5)), torch.tensor([[3], [4]])
    caches, logits = [model.new_cache(2, 17) for _ in range(2)], []
    for cache, grad in zip(caches, (False, True), strict=True):
        with torch.set_grad_enabled(grad):
            model(prompts, cache=cache)
            cache.advance(5)
            logits.append(model(ids, cache=cache))  # one token per row, all in one slot
    assert logits[1].requires_grad and torch.equal(logits[0], logits[1].detach())
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_a_cache_whose_tensors_are_not_contiguous_is_written_right():
    model = scaled_model()
    prompts = torch.randint(0, 40, (2, 5))
    plain, strided = model.new_cache(2, 17), model.new_cache(2, 17)
    strided.k = torch.zeros(strided.k.shape[::-1]).permute(4, 3, 2, 1, 0)  # same shape, other strides
    assert not strided.k.is_contiguous()
    with torch.inference_mode():
        for cache in (plain, strided):
            model(prompts, positions=torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 16, 16]]), cache=cache)
    assert torch.equal(plain.k, strided.k) and torch.equal(plain.v, strided.v)


def test_a_new_engine_decodes_with_the_weights_as_they_are_now():
    model = scaled_model()  # the modern block: q/k/v and gate/up are stacked copies in the decoder
    before = Generator(model).generate([[1, 2]], 8, temperature=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    model.train()
    model(torch.randint(0, 40, (2, 10))).sum().backward()
    opt.step()
    model.eval()
    after = Generator(model).generate([[1, 2]], 8, temperature=0)
    assert after == Generator(model).generate([[1, 2]], 8, temperature=0, use_cache=False)
    assert after != before


def test_a_cache_in_another_precision_than_the_weights():
    model = scaled_model(block_size=16)
    prompts = torch.randint(0, 40, (2, 6))
    full, half = model.new_cache(2, 17), model.new_cache(2, 17, dtype=torch.bfloat16)
    with torch.inference_mode():
        for cache in (full, half):  # the prefill writes several slots per row, the decode step one
            model(prompts, cache=cache)
            cache.advance(6)
        ids = torch.tensor([3, 4])
        torch.testing.assert_close(Decoder(model)(ids, half), Decoder(model)(ids, full), atol=0.1, rtol=0.05)
    assert half.k.dtype == torch.bfloat16
