"""The attention-interface capture: outputs unchanged, implementation restored, K/V projections sliced right."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvcompile.capture import CAPTURE_IMPL, capture_attention, kv_projection_weight, kv_weight_norms
from kvcompile.errors import KVCompileError

VOCAB = 128


def _llama(layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def _gemma2() -> nn.Module:
    # softcapped logits: not SDPA-capable, runs eager; layer 0 is a sliding-window layer
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, sliding_window=8,
                       max_position_embeddings=256)
    return Gemma2ForCausalLM(cfg).eval()


def _gemma3() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=256)
    return Gemma3ForCausalLM(cfg).eval()


def _phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0)
    return Phi3ForCausalLM(cfg).eval()


def _neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=256)
    return GPTNeoXForCausalLM(cfg).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


ARCHS = {"llama": _llama, "qwen2": _qwen2, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3, "neox": _neox,
         "gpt2": _gpt2}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_capture_keeps_outputs_and_restores_implementation(arch: str) -> None:
    torch.manual_seed(0)
    model = ARCHS[arch]()
    ids = torch.randint(0, VOCAB, (2, 20))
    before = model.config._attn_implementation
    calls: list[tuple[int, tuple[int, ...], tuple[int, ...], float]] = []

    def cb(layer, q, k, v, mask, scaling, module):
        assert k.shape == v.shape
        calls.append((layer, tuple(q.shape), tuple(k.shape), scaling))

    with torch.no_grad():
        ref = model(ids).logits
        with capture_attention(model, cb) as cap:
            assert model.config._attn_implementation.startswith(CAPTURE_IMPL)
            out = model(ids).logits
            cap.require()
    assert model.config._attn_implementation == before
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    n_layers = model.config.num_hidden_layers
    assert cap.layers == set(range(n_layers))
    assert [c[0] for c in calls] == list(range(n_layers))
    hq, hkv = model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", None) or \
        model.config.num_attention_heads
    for _, qs, ks, scaling in calls:
        assert qs[:3] == (2, hq, 20) and ks[:3] == (2, hkv, 20)
        assert scaling > 0


def test_capture_passes_sliding_window_masks() -> None:
    """A sliding layer's mask hides keys older than the window; a full layer's does not."""
    torch.manual_seed(0)
    model = _gemma3()
    masks: dict[int, torch.Tensor | None] = {}
    with torch.no_grad(), capture_attention(model, lambda i, q, k, v, m, s, mod: masks.__setitem__(i, m)):
        model(torch.randint(0, VOCAB, (1, 20)))
    sliding = masks[0]
    assert sliding is not None and sliding.dtype == torch.bool
    assert bool(sliding[0, 0, 19, 19]) and not bool(sliding[0, 0, 19, 19 - 8])
    full = masks[2]
    assert full is None or bool(full[0, 0, 19, 0])


def test_capture_restores_implementation_after_an_error() -> None:
    model = _llama()

    def boom(*args: object) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"), torch.no_grad(), capture_attention(model, boom):
        model(torch.randint(0, VOCAB, (1, 8)))
    assert model.config._attn_implementation == "sdpa"


def test_model_without_attention_interface_is_reported() -> None:
    model = _llama()

    class NoInterfaceAttention(nn.Module):
        """Stands in for attention code that computes its own softmax without the interface."""

        def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
            return torch.zeros_like(hidden_states), None

    for layer in model.model.layers:
        layer.self_attn = NoInterfaceAttention()
    with torch.no_grad(), capture_attention(model, lambda *a: None) as cap:
        model(torch.randint(0, VOCAB, (1, 8)))
        with pytest.raises(KVCompileError, match=r"LlamaForCausalLM does not use transformers' AttentionInterface"):
            cap.require()


def test_non_transformers_model_is_rejected() -> None:
    with pytest.raises(KVCompileError, match="not a transformers PreTrainedModel"), \
            capture_attention(nn.Linear(2, 2), lambda *a: None):
        pass


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "neox", "gpt2"])
def test_kv_projection_weight_produces_the_captured_values(arch: str) -> None:
    """V has no RoPE, so projecting the attention input with the sliced weight must give the captured values."""
    torch.manual_seed(0)
    model = ARCHS[arch]()
    cfg = model.config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    d = cfg.hidden_size // hq
    inputs: dict[int, torch.Tensor] = {}
    captured: dict[int, tuple[torch.Tensor, nn.Module]] = {}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs[id(module)] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    attn_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and m.__class__.__name__.endswith(
        "Attention")]
    assert attn_modules
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in attn_modules]
    with torch.no_grad(), capture_attention(model, lambda i, q, k, v, m, s, mod: captured.__setitem__(i, (v, mod))):
        model(torch.randint(0, VOCAB, (1, 12)))
    for h in handles:
        h.remove()
    for v, mod in captured.values():
        w = kv_projection_weight(mod, "v", hq, hkv, d)
        assert w is not None and w.shape == (hkv, d, cfg.hidden_size)
        x = inputs[id(mod)]  # [1, T, hidden]
        expected = torch.einsum("hdk,btk->bhtd", w, x)
        diff = v - expected
        # biases (Qwen2, GPT-2, NeoX) are a per-channel constant over tokens: remove it before comparing
        diff = diff - diff[:, :, :1]
        assert diff.abs().max() < 1e-4
    norms = kv_weight_norms(next(iter(captured.values()))[1], "k", hq, hkv, d)
    assert norms is not None and len(norms) == hkv
    for n in norms:
        assert 0 < n["spectral"] <= n["frobenius"]


def test_kv_weight_norms_match_an_svd() -> None:
    model = _llama()
    attn = model.model.layers[0].self_attn
    norms = kv_weight_norms(attn, "k", 4, 2, 16)
    assert norms is not None
    for h, n in enumerate(norms):
        w = attn.k_proj.weight[h * 16:(h + 1) * 16].detach().double()
        assert n["spectral"] == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-6)
        assert n["frobenius"] == pytest.approx(float(w.norm()), rel=1e-6)


def test_unknown_projection_layout_gives_none() -> None:
    assert kv_projection_weight(nn.Module(), "k", 4, 2, 16) is None
    assert kv_weight_norms(nn.Module(), "v", 4, 2, 16) is None
