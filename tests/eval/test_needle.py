"""Needle retrieval harness on a tiny random-weight model: haystacks, prompts, code extraction, fp16 vs quantized."""

from __future__ import annotations

import pytest
import torch

from kvcompile.errors import KVCompileError
from kvcompile.eval.needle import Needle, build_haystacks, extract_code, prompt_ids, run_needle, use_chat_template
from kvcompile.formats import KVFormat
from kvcompile.kvparams import KVParams
from kvcompile.passes.calibrate import finalize_scales
from kvcompile.passes.lower import lower
from kvcompile.plan import ModelShape, Plan
from tests.tiny import WORDS, kv_params, tiny_llama_config, tiny_model, tiny_tokenizer

CFG = tiny_llama_config()
SHAPE = ModelShape.from_config(CFG)
OPTS = dict(lengths=(48,), depths=(0.5,), multi_haystacks=1, multi_needles=2, chunk=16, max_new_tokens=4)


def _text(n_sentences: int = 400, seed: int = 0) -> str:
    """Pseudo-prose: sentences of the tiny vocabulary's words, paragraphs of five sentences."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_sentences):
        n = int(torch.randint(6, 14, (1,), generator=g))
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=g).tolist()]
        out.append(" ".join(words) + "." + ("\n\n" if i % 5 == 4 else " "))
    return "".join(out)


def _plan(fmt: str, window: int) -> tuple[Plan, KVParams]:
    plan = Plan.uniform(SHAPE, KVFormat.parse(fmt), KVFormat.parse(fmt), window=window, sinks=0, block=16)
    params = kv_params(SHAPE, 0.5)
    finalize_scales(plan, params)
    return plan, params


@pytest.mark.parametrize("answer,code", [
    (" 4821.", "4821"), ("4821", "4821"), (" is 4,821 indeed", "4821"), ("code: 12 34", "12"),
    (" the code is unknown", None), ("", None), ("Alpha 0042 and 7", "0042"),
])
def test_extract_code(answer: str, code: str | None) -> None:
    assert extract_code(answer) == code


def test_haystacks_hide_every_needle_once_in_depth_order() -> None:
    tok = tiny_tokenizer()
    text = _text()
    hs = build_haystacks(tok, text, lengths=(80, 200), depths=(0.1, 0.5, 0.9), multi_haystacks=2, multi_needles=3,
                         seed=1)
    assert [(h.kind, h.length) for h in hs] == [("single", 80)] * 3 + [("multi", 80)] * 2 + \
        [("single", 200)] * 3 + [("multi", 200)] * 2
    for h in hs:
        positions = [h.text.count(nd.sentence) for nd in h.needles]
        assert positions == [1] * len(h.needles)
        where = [h.text.index(nd.sentence) for nd in h.needles]
        assert where == sorted(where)  # needles sit in the order of their depths
        n_tokens = len(tok(h.text, add_special_tokens=False)["input_ids"])
        assert abs(n_tokens - h.length) <= 0.1 * h.length + 4
        assert len({nd.name for nd in h.needles}) == len(h.needles)
    single = [h for h in hs if h.kind == "single" and h.length == 200]
    rel = [single[i].text.index(single[i].needles[0].sentence) / len(single[i].text) for i in range(3)]
    assert rel[0] < 0.25 and 0.4 < rel[1] < 0.65 and rel[2] > 0.8
    again = build_haystacks(tok, text, lengths=(80, 200), depths=(0.1, 0.5, 0.9), multi_haystacks=2,
                            multi_needles=3, seed=1)
    assert [h.text for h in again] == [h.text for h in hs]


def test_prompt_uses_chat_template_and_primes_the_answer() -> None:
    tok = tiny_tokenizer()
    nd = Needle("Alpha", "4821", 0.5)
    assert not use_chat_template(tok, None)
    with pytest.raises(KVCompileError, match="chat template"):
        use_chat_template(tok, True)
    plain = prompt_ids(tok, "the water", nd, chat=False)
    primer = tok(nd.primer, add_special_tokens=False)["input_ids"]
    assert plain[-len(primer):] == primer
    tok.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>{% endif %}")
    assert use_chat_template(tok, None)
    chat = prompt_ids(tok, "the water", nd, chat=True)
    assert chat[0] == tok.bos_token_id and tok.eos_token_id in chat
    assert chat[-len(primer) - 1:] == [tok.bos_token_id, *primer]


@pytest.mark.parametrize("fmt,window", [("fp16", 8), ("nsep-4", 4096)])
def test_unquantized_plans_answer_like_fp16(fmt: str, window: int) -> None:
    """No token is ever quantized (fp16 plan; nsep plan with a window longer than the prompt): same answers."""
    model = lower(tiny_model(CFG), *_plan(fmt, window), mode="reference")
    r = run_needle(model, tiny_tokenizer(), text=_text(), **OPTS)
    trials = r["details"]["trials"]
    assert len(trials) == 3 and r["details"]["questions"] == 3
    assert all(t["fp16_answer"] == t["quantized_answer"] for t in trials)
    assert all(t["fp16_answer"].strip() for t in trials)  # the model did generate something
    assert r["delta"] == 0.0 and r["details"]["missed"] == []
    assert set(r["details"]["by_length"]) == {"48"} and set(r["details"]["by_kind"]) == {"single", "multi"}


def test_scoring_reports_needles_fp16_found_and_quantized_missed() -> None:
    """With a baseline that answered every code, the tiny model (whose vocabulary has no digits) misses them all."""
    # kivi is quantized by formats.py directly, not by the write kernel (slow under Triton's CPU interpreter)
    model = lower(tiny_model(CFG), *_plan("kivi-2g16", 0), mode="reference")
    tok = tiny_tokenizer()
    first = run_needle(model, tok, text=_text(), **OPTS)
    codes = [t["code"] for t in first["details"]["trials"]]
    perfect = {**first["baseline"], "answers": [f" {c}." for c in codes]}
    r = run_needle(model, tok, text=_text(), baseline=perfect, **OPTS)
    assert r["fp16"] == 1.0 and r["quantized"] == 0.0 and r["delta"] == -1.0
    assert sorted(m["code"] for m in r["details"]["missed"]) == sorted(codes)
    assert r["details"]["by_length"]["48"] == {"fp16": 1.0, "quantized": 0.0, "n": 3}
    with pytest.raises(KVCompileError, match="baseline"):
        run_needle(model, tok, text=_text(seed=5), baseline=perfect, **OPTS)
