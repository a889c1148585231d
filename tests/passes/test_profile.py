"""The profile pass on tiny random-weight models: planted outliers are found, statistics stream, files round-trip."""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from kvcompile.capture import capture_attention
from kvcompile.errors import KVCompileError
from kvcompile.formats import fake_quantize, nsep_scale, reference_attention
from kvcompile.passes import profile as profile_mod
from kvcompile.passes.profile import (
    HIST_BINS,
    PROFILE_VERSION,
    Profile,
    _DirHist,
    _Sensitivity,
    _variants,
    print_summary,
    profile_model,
)

VOCAB, D, HQ, HKV = 128, 16, 4, 2
WINDOW, SINKS = 16, 2
#: (layer, KV head) -> planted RoPE channel pair (c, c + d/2): RoPE rotates channel c into c + d/2 and back, so a
#: planted pair keeps its energy in exactly those two channels after RoPE
PLANTED = {(1, 1): (2, 10), (0, 0): (5, 13)}


def _llama(plant: bool = True, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=HQ,
                      num_key_value_heads=HKV, head_dim=D, vocab_size=VOCAB, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    if plant:
        with torch.no_grad():
            for (layer, head), chans in PLANTED.items():
                w = model.model.layers[layer].self_attn.k_proj.weight
                for c in chans:
                    w[head * D + c] *= 30.0
    return model


def _windows(n: int = 8, length: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def planted_profile() -> Profile:
    return profile_model(_llama(), _windows(), holdout=2, window=WINDOW, sinks=SINKS, progress=False, query_stride=1)


# ---------------------------------------------------------------------------------------------- what it finds
def test_finds_exactly_the_planted_outlier_channels(planted_profile: Profile) -> None:
    p = planted_profile
    for layer in range(2):
        for head in range(HKV):
            hd = p.layers[layer]["k"]["heads"][head]
            expected = set(PLANTED.get((layer, head), ()))
            assert set(hd["outlier_channels"]) == expected, (layer, head)
            if expected:
                assert hd["outlier_ratio"] > 8
                assert set(hd["top_channels"][:2]) == expected
            else:
                assert hd["outlier_ratio"] < 8
            # V was not touched: no outlier channels there
            assert p.layers[layer]["v"]["heads"][head]["outlier_channels"] == []
    absmax = p.tensor(1, "k", "absmax")
    assert absmax.shape == (HKV, D)
    assert int(absmax[1].argmax()) in PLANTED[(1, 1)]


def test_planted_heads_are_the_most_sensitive_at_int_token_4(planted_profile: Profile) -> None:
    sens = planted_profile.sens("k", "int-token-4")
    ranked = sorted(((sens[i][h], (i, h)) for i in range(2) for h in range(HKV)), reverse=True)
    assert {cell for _, cell in ranked[:2]} == set(PLANTED)
    # by a wide margin: a x30 channel pair takes the per-token scale, the other channels round to nothing
    assert ranked[1][0] > 5 * ranked[2][0]


def test_sensitivity_table_shape_and_ordering(planted_profile: Profile) -> None:
    p = planted_profile
    fmts = p.sensitivity["formats"]
    assert fmts == ["fp16", "nsep-8", "nsep-8c", "nsep-4", "nsep-4c", "nsep-2", "nsep-2c", "int-token-4"]
    for role in ("k", "v"):
        for f in fmts:
            rel, cos = p.sens(role, f), p.sens(role, f, "cos")
            assert len(rel) == 2 and all(len(row) == HKV for row in rel)
            for row_r, row_c in zip(rel, cos, strict=True):
                for r, c in zip(row_r, row_c, strict=True):
                    assert r >= 0 and -1 <= c <= 1 + 1e-6
        for i in range(2):
            for h in range(HKV):
                assert p.sens(role, "fp16")[i][h] == 0.0
                # more bits, less error
                assert p.sens(role, "nsep-8")[i][h] < p.sens(role, "nsep-4")[i][h] < p.sens(role, "nsep-2")[i][h]
                assert p.sens(role, "nsep-2", "cos")[i][h] < p.sens(role, "nsep-8", "cos")[i][h]


def test_norms_and_weights_are_reported(planted_profile: Profile) -> None:
    p = planted_profile
    for entry in p.layers:
        assert entry["captured"] and entry["sliding"] is False
        for role in ("k", "v"):
            for hd in entry[role]["heads"]:
                assert 0 < hd["norm_min"] <= hd["norm_mean"] <= hd["norm_max"]
                assert hd["norm_ratio"] == pytest.approx(hd["norm_max"] / hd["norm_min"])
                assert 0 < hd["weight_spectral"] <= hd["weight_frobenius"]
                assert hd["tokens"] == 6 * (64 - SINKS)
    # the planted K heads carry 30x rows: their k_proj slices have far larger norms than V's
    hd = p.layers[1]["k"]["heads"][1]
    assert hd["weight_spectral"] > 10 * p.layers[1]["v"]["heads"][1]["weight_spectral"]
    disp = p.summary["disparity"]
    assert disp["weight_spectral_k_over_v"]["layers"] == 2
    assert disp["activation_norm_k_over_v"]["median"] > 1


def test_direction_statistics_match_a_direct_computation(planted_profile: Profile) -> None:
    """dir_max is exact; the streamed 99.9th percentile lies within one histogram bin above the exact one."""
    model, windows = _llama(), _windows()
    ks: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    with torch.no_grad(), capture_attention(model, lambda i, q, k, v, m, s, mod: ks[i].append(k[:, :, SINKS:])):
        model(windows[:6])
    for layer in range(2):
        x = torch.cat(ks[layer], dim=0).transpose(0, 1).reshape(HKV, -1, D)  # [H, N, d]
        u = (x / x.norm(dim=-1, keepdim=True)).abs()
        exact_max = u.amax(dim=1)
        exact_p = _kth(u, 0.999)
        got_max = planted_profile.tensor(layer, "k", "dir_max")
        got_p = planted_profile.tensor(layer, "k", "dir_p999")
        torch.testing.assert_close(got_max, exact_max, rtol=1e-5, atol=1e-6)
        assert bool((got_p >= exact_p - 1e-6).all()) and bool((got_p <= exact_p + 1.0 / HIST_BINS + 1e-6).all())
        assert bool((got_p <= got_max + 1e-7).all())
        torch.testing.assert_close(planted_profile.tensor(layer, "k", "absmax"), x.abs().amax(dim=1))
        torch.testing.assert_close(planted_profile.tensor(layer, "k", "std").double(), x.double().std(dim=1,
                                   correction=0), rtol=1e-4, atol=1e-6)
        # the centring mean comes from the first 4 statistics windows
        mean4 = torch.cat(ks[layer], dim=0)[:4].mean(dim=(0, 2))
        torch.testing.assert_close(planted_profile.tensor(layer, "k", "mean"), mean4, rtol=1e-5, atol=1e-6)


def _kth(u: torch.Tensor, q: float) -> torch.Tensor:
    """The exact ``q`` quantile along dim 1 as the profile defines it: the ceil(q * N)-th smallest value."""
    k = math.ceil(q * u.shape[1])
    return u.sort(dim=1).values[:, k - 1]


def test_histogram_quantile_is_within_one_bin_of_the_exact_quantile() -> None:
    torch.manual_seed(0)
    hist = _DirHist(3, 8, torch.device("cpu"), HIST_BINS)
    # half-normal coordinates, like those of a unit direction: the 99.9th percentile lies well below the max
    chunks = [(torch.randn(3, 5000, 8) * 0.1).abs().clamp(max=1) for _ in range(4)]
    for c in chunks:
        hist.update(c, 2 * c)
    u = torch.cat(chunks, dim=1)
    for got, data in ((hist.quantile(0.999)[0], u), (hist.quantile(0.999)[1], 2 * u)):
        exact = _kth(data, 0.999)
        assert bool((got >= exact - 1e-6).all()) and bool((got <= exact + 1.0 / HIST_BINS + 1e-6).all())
        assert bool((got < data.amax(dim=1)).all())  # an interior quantile, not the max
    torch.testing.assert_close(hist.max[0], u.amax(dim=1))
    torch.testing.assert_close(hist.quantile(0.5)[0], _kth(u, 0.5), atol=1.0 / HIST_BINS, rtol=0)


# ---------------------------------------------------------------------------------------------- streaming
def test_statistics_stream_batched_or_one_window_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    model, windows = _llama(), _windows()
    kw = dict(holdout=2, window=WINDOW, sinks=SINKS, progress=False, query_stride=2)
    one = profile_model(model, windows, batch_size=1, **kw)
    batched = profile_model(model, windows, batch_size=3, **kw)
    # the same, without keeping pass 1's K/V (the model runs on those windows again)
    monkeypatch.setattr(profile_mod, "MEAN_CACHE_BYTES", 0)
    rerun = profile_model(model, windows, batch_size=2, **kw)
    for other in (batched, rerun):
        assert other.tensors.keys() == one.tensors.keys()
        for key, t in one.tensors.items():
            torch.testing.assert_close(other.tensors[key], t, rtol=1e-4, atol=1e-5, msg=key)
        for role in ("k", "v"):
            for f in one.sensitivity["formats"]:
                for metric in ("rel_mse", "cos"):
                    a = torch.tensor(one.sens(role, f, metric), dtype=torch.float64)
                    b = torch.tensor(other.sens(role, f, metric), dtype=torch.float64)
                    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-7)
        for la, lb in zip(one.layers, other.layers, strict=True):
            for role in ("k", "v"):
                for ha, hb in zip(la[role]["heads"], lb[role]["heads"], strict=True):
                    assert ha["outlier_channels"] == hb["outlier_channels"]
                    assert hb["norm_mean"] == pytest.approx(ha["norm_mean"], rel=1e-5)
                    assert hb["norm_std"] == pytest.approx(ha["norm_std"], rel=1e-3)
    assert rerun.timings["mean_pass_s"] > 0


def test_past_only_sensitivity_matches_reference_attention() -> None:
    """Per query t, keys/values in [sinks, t - window) quantized, the rest exact: checked against formats.py."""
    torch.manual_seed(3)
    B, T, window, sinks, stride = 2, 40, 8, 2, 3
    q = torch.randn(B, HQ, T, D)
    k = torch.randn(B, HKV, T, D) + 0.5
    v = torch.randn(B, HKV, T, D)
    variants = _variants(("int-token-4", "nsep-4"))
    p = torch.rand(HKV, D) * 0.4 + 0.3
    mu = {(0, r): torch.randn(HKV, D) * 0.3 for r in ("k", "v")}
    scales = {(0, r, n): p for r in ("k", "v") for n in ("dir_p999", "cdir_p999")}
    sens = _Sensitivity(variants, 1, HKV, window=window, sinks=sinks, stride=stride, scales=scales, means=mu)
    sens.update(0, q, k, v, None, 0.3, nn.Module())
    table = sens.table()
    kpos = torch.arange(T)
    rep = HQ // HKV
    for role in ("k", "v"):
        x = k if role == "k" else v
        for var in variants:
            scale = nsep_scale(p, 4) if var.fmt.kind == "nsep" else None
            m = mu[(0, role)][None, :, None, :] if var.centred else 0.0
            x_hat = fake_quantize(x - m, var.fmt, role, scale) + m
            err = torch.zeros(HKV, dtype=torch.float64)
            ref = torch.zeros(HKV, dtype=torch.float64)
            cos, n = torch.zeros(HKV, dtype=torch.float64), 0
            for t in range(sinks + window + 1, T, stride):
                quant = ((kpos >= sinks) & (kpos < t - window))[None, None, :, None]
                mixed = torch.where(quant, x_hat, x)
                kk, vv = (mixed, v) if role == "k" else (k, mixed)
                o_q = reference_attention(q[:, :, t:t + 1], kk, vv, 0.3, torch.tensor([t]), kpos)
                o = reference_attention(q[:, :, t:t + 1], k, v, 0.3, torch.tensor([t]), kpos)
                e = (o_q - o).double().square().sum(dim=(0, 2, 3)).view(HKV, rep).sum(-1)
                err += e
                ref += o.double().square().sum(dim=(0, 2, 3)).view(HKV, rep).sum(-1)
                c = torch.nn.functional.cosine_similarity(o_q, o, dim=-1).double()  # [B, Hq, 1]
                cos += c.sum(dim=(0, 2)).view(HKV, rep).sum(-1)
                n += B * rep
            got = torch.tensor(table[role][var.name]["rel_mse"][0], dtype=torch.float64)
            torch.testing.assert_close(got, err / ref, rtol=1e-4, atol=1e-9)
            got_cos = torch.tensor(table[role][var.name]["cos"][0], dtype=torch.float64)
            torch.testing.assert_close(got_cos, cos / n, rtol=1e-5, atol=1e-6)
            assert bool((got > 0).all())


# ---------------------------------------------------------------------------------------------- architectures
def _qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=512)).eval()


def _gemma2() -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                          vocab_size=VOCAB, sliding_window=8, max_position_embeddings=512)).eval()


def _gemma3() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=512)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [_qwen2, _gemma2, _gemma3], ids=["qwen2", "gemma2", "gemma3"])
def test_profiles_other_architectures(build: Callable[[], nn.Module]) -> None:
    model = build()
    impl = model.config._attn_implementation
    p = profile_model(model, _windows(5, 48), holdout=1, window=WINDOW, sinks=SINKS, progress=False,
                      candidates=("fp16", "nsep-4", "int-token-4"))
    assert model.config._attn_implementation == impl
    cfg = model.config
    sliding = [t == "sliding_attention" for t in (getattr(cfg, "layer_types", None) or [])]
    assert [e["sliding"] for e in p.layers] == (sliding or [False] * cfg.num_hidden_layers)
    assert p.shape.head_dim == getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for i, entry in enumerate(p.layers):
        assert entry["captured"]
        assert p.tensor(i, "k", "cdir_p999").shape == (p.shape.num_kv_heads, p.shape.head_dim)
        for role in ("k", "v"):
            err = p.sens(role, "int-token-4")[i]
            if entry["sliding"]:
                # the sliding window (8) is shorter than the fp16 window (16): no query ever sees a quantized key
                assert err == [0.0] * p.shape.num_kv_heads
            else:
                assert all(e > 0 for e in err)


# ---------------------------------------------------------------------------------------------- errors
def test_model_without_attention_interface_is_an_error() -> None:
    model = _llama(plant=False)

    class OwnAttention(nn.Module):
        def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
            return hidden_states * 0.5, None

    for layer in model.model.layers:
        layer.self_attn = OwnAttention()
    with pytest.raises(KVCompileError, match="LlamaForCausalLM does not use transformers' AttentionInterface"):
        profile_model(model, _windows(), window=WINDOW, sinks=SINKS, progress=False)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("windows", "match"), [
    (torch.zeros(0, 64, dtype=torch.long), "no calibration tokens"),
    (torch.zeros(3, 0, dtype=torch.long), "no calibration tokens"),
    (torch.zeros(1, 64, dtype=torch.long), "at least 2 calibration windows"),
    (torch.zeros(4, WINDOW + SINKS + 1, dtype=torch.long), "windows longer than"),
    (torch.zeros(4, 64), "integer token ids"),
    (torch.zeros(64, dtype=torch.long), "2-D tensor"),
])
def test_bad_windows_are_clear_errors(windows: torch.Tensor, match: str) -> None:
    with pytest.raises(KVCompileError, match=match):
        profile_model(_llama(plant=False), windows, window=WINDOW, sinks=SINKS, progress=False)


def test_unknown_candidate_is_an_error() -> None:
    with pytest.raises(KVCompileError, match="unknown candidate format"):
        profile_model(_llama(plant=False), _windows(), window=WINDOW, sinks=SINKS, progress=False,
                      candidates=("nsep-5x",))


def test_few_windows_keep_one_for_statistics_and_one_held_out() -> None:
    p = profile_model(_llama(plant=False), _windows(2), holdout=4, window=WINDOW, sinks=SINKS, progress=False,
                      candidates=("int-token-4",))
    assert p.settings["stats_windows"] == 1 and p.settings["holdout_windows"] == 1
    assert all(x > 0 for row in p.sens("k", "int-token-4") for x in row)


def test_no_candidates_skips_sensitivity() -> None:
    p = profile_model(_llama(plant=False), _windows(4), window=WINDOW, sinks=SINKS, progress=False, candidates=())
    assert p.sensitivity["formats"] == [] and p.layers[0]["k"]["heads"][0]["tokens"] > 0


# ---------------------------------------------------------------------------------------------- files
def test_save_load_round_trip(planted_profile: Profile, tmp_path: Path) -> None:
    out = tmp_path / "prof"
    planted_profile.save(out)
    for name in ("profile.json", "stats.safetensors", "report.md", "outliers.png", "sensitivity.png", "norms.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary folder left behind
    data = json.loads((out / "profile.json").read_text())
    assert data["version"] == PROFILE_VERSION and data["shape"]["num_kv_heads"] == HKV
    back = Profile.load(out)
    assert back.summary == json.loads(json.dumps(planted_profile.summary))
    assert back.tensors.keys() == planted_profile.tensors.keys()
    for key, t in planted_profile.tensors.items():
        assert torch.equal(back.tensors[key], t), key
    report = (out / "report.md").read_text()
    # the planted heads and their channels head the K outlier table
    rows = [ln for ln in report.splitlines() if ln.startswith(("| 1 | 1 |", "| 0 | 0 |"))]
    assert rows[0].startswith("| 1 | 1 |") and rows[0].endswith("| 10, 2 |")
    assert rows[1].startswith("| 0 | 0 |") and rows[1].endswith("| 13, 5 |")

    # saving again into a folder that holds other files replaces the profile's files and keeps the others
    (out / "kvcompile.json").write_text("{}")
    planted_profile.save(out)
    assert (out / "kvcompile.json").read_text() == "{}"
    assert Profile.load(out).shape == planted_profile.shape


def test_load_rejects_newer_and_missing(planted_profile: Profile, tmp_path: Path) -> None:
    with pytest.raises(KVCompileError, match="not a profile folder"):
        Profile.load(tmp_path / "nothing")
    out = planted_profile.save(tmp_path / "p")
    data = json.loads((out / "profile.json").read_text())
    data["version"] = PROFILE_VERSION + 1
    (out / "profile.json").write_text(json.dumps(data))
    with pytest.raises(KVCompileError, match="upgrade kvcompile"):
        Profile.load(out)


def test_print_summary_renders_every_layer(planted_profile: Profile) -> None:
    from rich.console import Console

    console = Console(record=True, width=220)
    print_summary(planted_profile, console)
    text = console.export_text()
    assert "K nsep-4" in text and "K int-token-4" in text
    rows = [ln for ln in text.splitlines() if re.match(r"│\s+[01]\s+│", ln)]
    assert len(rows) == 2
    # each layer's worst K head and its planted channels, largest first
    assert rows[0].rstrip(" │").endswith("0: 13, 5") and rows[1].rstrip(" │").endswith("1: 10, 2")


def test_non_finite_ratios_survive_json(tmp_path: Path, planted_profile: Profile) -> None:
    """A channel never non-zero gives an infinite ratio; profile.json stays valid JSON and loads back."""
    p = Profile.load(planted_profile.save(tmp_path / "p"))
    p.layers[0]["k"]["heads"][0]["outlier_ratio"] = math.inf
    p.save(tmp_path / "q")
    json.loads((tmp_path / "q" / "profile.json").read_text())
    assert Profile.load(tmp_path / "q").layers[0]["k"]["heads"][0]["outlier_ratio"] == math.inf


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_profile_runs_in_under_3_minutes(tmp_path: Path) -> None:
    models = pytest.importorskip("kvcompile.models")
    data = pytest.importorskip("kvcompile.data")
    if not hasattr(models, "load_model") or not hasattr(data, "token_windows"):
        pytest.skip("the model zoo (kvcompile.models.load_model / kvcompile.data.token_windows) is not available")
    model, tok = models.load_model("smollm2-135m", "cpu")
    windows = data.token_windows("austen", tok, split="calib", n_windows=32, seq_len=1024, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    p = profile_model(model, windows, progress=False)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"smollm2-135m profile, 32 x 1024 tokens: {elapsed:.0f} s wall, {cpu:.0f} s CPU")
    # "under 3 minutes on the 2-core CI machine", counted in CPU seconds (2 cores x 180 s) so that other jobs
    # sharing the machine do not make the check flaky; measured ~176 s CPU on one thread
    assert cpu < 2 * 180, f"profile took {cpu:.0f} s of CPU time ({elapsed:.0f} s wall)"
    assert p.shape.num_layers == 30 and all(e["captured"] for e in p.layers)
    # MODELS.md: mild K outliers (channel max/median about 7)
    worst = max(e["k"]["max_outlier_ratio"] for e in p.layers)
    assert 2 < worst < 100

    def median(fmt: str) -> float:
        return statistics.median(x for row in p.sens("k", fmt) for x in row)

    # measured: K medians 1.5e-5 (nsep-8) < 6.8e-4 (nsep-4) < 2.3e-3 (int-token-4) < 0.10 (nsep-2)
    assert median("nsep-8") < median("nsep-4") < median("int-token-4") < median("nsep-2")
    # the worst K head (layer 18: a constant offset is 70% of its norm) needs centring: measured 0.016 centred
    # against 0.057 for int-token-4 and 0.11 for nsep-4 uncentred
    worst = {f: max(max(row) for row in p.sens("k", f)) for f in ("nsep-4c", "int-token-4")}
    assert worst["nsep-4c"] < worst["int-token-4"]
    p.save(tmp_path / "smollm2")
    assert (tmp_path / "smollm2" / "report.md").is_file()
