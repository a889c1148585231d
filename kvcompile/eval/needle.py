"""Needle-in-a-haystack retrieval through the quantized runtime, against fp16 in the same run.

As in the nsep README's experiment: secret codes ("The secret code for Alpha is 4821.") are hidden at several depths
in a haystack of real text (the eval split of the text source), the question comes at the end ("What is the secret
code for Alpha?"), the model answers greedily and the first number of its answer must equal the code exactly.
Single-needle haystacks hold one code at one depth; multi-needle haystacks hold several codes and ask for each.

How a prompt is run (both sides identically, on the same lowered model): the part shared by every question of a
haystack (instruction + haystack) is prefilled ``chunk`` tokens at a time into a fresh cache, so the haystack leaves
the fp16 window and is quantized before any question token sees it, as in a long streamed context; each question then
continues from a copy of that cache through ``generate`` (greedy, ``max_new_tokens`` tokens), whose decode steps run
the fused decode path. Prefilling the whole prompt in one forward instead would let the first answer token attend to
an all-fp16 haystack and hide exactly the errors this task looks for. fp16 uses ``transformers.DynamicCache``.

Instruct models get their tokenizer's chat template (when it has one), with the assistant's answer primed by
"The secret code for Alpha is" so that the first generated tokens are the code.
"""

from __future__ import annotations

import copy
import hashlib
import random
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import Progress

from kvcompile.errors import KVCompileError

__all__ = ["NAMES", "Haystack", "Needle", "build_haystacks", "extract_code", "prompt_ids", "run_needle"]

NAMES = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet", "Kilo", "Lima")
INSTRUCTION = "Below is a long text. Some secret codes are hidden in it. Read it, then answer the question after it."
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: characters of source text taken per wanted token before tokenizing (English BPE averages ~4-5 characters a token)
_CHARS_PER_TOKEN = 8
_SENTENCE_END = re.compile(r"[.!?;]\s|\n")
_WORD_END = re.compile(r"\s")


@dataclass(frozen=True)
class Needle:
    """One secret: a name, a code and the relative depth (0 = start, 1 = end of the haystack) it is hidden at."""

    name: str
    code: str
    depth: float

    @property
    def sentence(self) -> str:
        return f"The secret code for {self.name} is {self.code}."

    @property
    def question(self) -> str:
        return f"What is the secret code for {self.name}?"

    @property
    def primer(self) -> str:
        return f"The secret code for {self.name} is"


@dataclass
class Haystack:
    """A text of about ``length`` tokens with ``needles`` hidden in it; ``kind`` is "single" or "multi"."""

    kind: str
    length: int
    text: str
    needles: list[Needle] = field(default_factory=list)


def extract_code(answer: str) -> str | None:
    """The first number in a generated answer ("4821", "4,821" -> "4821"), or None if there is none."""
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)
    m = re.search(r"\d+", cleaned)
    return m.group(0) if m else None


def _paragraph_starts(text: str) -> list[int]:
    starts = [0] + [m.end() for m in re.finditer(r"\n\s*\n", text)]
    return starts


def _filler(tokenizer: Any, text: str, starts: list[int], n_tokens: int, rng: random.Random) -> str:
    """About ``n_tokens`` tokens of ``text`` starting at a random paragraph (decoded back to text)."""
    span = n_tokens * _CHARS_PER_TOKEN
    usable = [s for s in starts if s + span <= len(text)] or [0]
    start = rng.choice(usable)
    ids = tokenizer(text[start:start + span], add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise KVCompileError(f"the eval text has fewer than {n_tokens} tokens to build a haystack from; "
                             "use shorter --ctx or a longer text")
    return tokenizer.decode(ids[:n_tokens], skip_special_tokens=True).strip()


def _insert(filler: str, needles: list[Needle]) -> str:
    """Hide each needle's sentence at the first sentence or line end at or after its depth (else a word end)."""
    reach = max(200, len(filler) // 20)  # how far past the depth a sentence end may be before a word end will do
    cuts = []
    for nd in needles:
        target = int(nd.depth * len(filler))
        m = _SENTENCE_END.search(filler, target, target + reach) or _WORD_END.search(filler, target)
        cuts.append((m.end() if m else len(filler), nd))
    out = filler
    for pos, nd in sorted(cuts, key=lambda c: c[0], reverse=True):
        out = f"{out[:pos].rstrip()} {nd.sentence} {out[pos:].lstrip()}"
    return out


def build_haystacks(tokenizer: Any, text: str, *, lengths: tuple[int, ...] | list[int],
                    depths: tuple[float, ...] | list[float] = DEFAULT_DEPTHS, multi_haystacks: int = 1,
                    multi_needles: int = 3, seed: int = 0) -> list[Haystack]:
    """Haystacks of real ``text``: per length, one single-needle haystack per depth, then ``multi_haystacks``
    haystacks with ``multi_needles`` needles each (at evenly spread depths). Deterministic in ``seed``."""
    if multi_needles > len(NAMES):
        raise KVCompileError(f"at most {len(NAMES)} needles fit in one haystack (got {multi_needles})")
    rng = random.Random(seed)
    starts = _paragraph_starts(text)
    out: list[Haystack] = []
    for length in lengths:
        specs: list[tuple[str, list[float]]] = [("single", [float(d)]) for d in depths]
        specs += [("multi", [(j + 1) / (multi_needles + 1) for j in range(multi_needles)])
                  for _ in range(multi_haystacks if multi_needles > 0 else 0)]
        for kind, ds in specs:
            names = rng.sample(NAMES, len(ds))
            needles = [Needle(nm, str(rng.randint(1000, 9999)), d) for nm, d in zip(names, ds, strict=True)]
            overhead = sum(len(tokenizer(" " + nd.sentence, add_special_tokens=False)["input_ids"]) for nd in needles)
            filler = _filler(tokenizer, text, starts, max(16, int(length) - overhead), rng)
            out.append(Haystack(kind, int(length), _insert(filler, needles), needles))
    return out


def use_chat_template(tokenizer: Any, chat: bool | None) -> bool:
    """Whether prompts go through the tokenizer's chat template (``chat=None``: when it has one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has:
        raise KVCompileError("this tokenizer has no chat template; run the needle task without chat=True")
    return has if chat is None else chat


def prompt_ids(tokenizer: Any, haystack: str, needle: Needle, chat: bool) -> list[int]:
    """Token ids of the whole prompt for one question, answer primer included."""
    body = f"{INSTRUCTION}\n\n{haystack}\n\n{needle.question}"
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": body + " Answer with the code only."}],
                                             tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text + needle.primer, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"{body}\nAnswer: {needle.primer}")["input_ids"])


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None) if base is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # A fresh config, so that a checkpoint's sampling defaults (temperature, top_p) cannot make decoding non-greedy.
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=eos if eos is not None else tokenizer.eos_token_id, pad_token_id=pad)


def _answers(model: Any, tokenizer: Any, prompts: list[list[int]], prefix_len: int, *, quantized: bool, chunk: int,
             max_new_tokens: int, progress: Progress, task: Any) -> list[str]:
    """Greedy answers to the prompts of one haystack, which share their first ``prefix_len`` tokens."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    gen_cfg = _generation_config(model, tokenizer, max_new_tokens)
    cache = model.kvcompile.new_cache() if quantized else DynamicCache()
    prefix = torch.tensor([prompts[0][:prefix_len]], device=dev)
    with torch.no_grad():
        for s in range(0, prefix_len, chunk):
            model(prefix[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        out = []
        for j, p in enumerate(prompts):
            # each question continues from its own copy of the prefilled haystack (the last one may use the original)
            c = cache if j == len(prompts) - 1 else copy.deepcopy(cache)
            ids = torch.tensor([p], device=dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=c,
                                 generation_config=gen_cfg)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
            progress.advance(task)
    return out


def _digest(prompts: list[list[list[int]]], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(repr(settings).encode())
    for group in prompts:
        for p in group:
            h.update(b"|" + ",".join(map(str, p)).encode())
    return h.hexdigest()[:16]


def _accuracy(rows: list[dict[str, Any]], side: str) -> float:
    return sum(r[f"{side}_ok"] for r in rows) / len(rows) if rows else float("nan")


def run_needle(model: torch.nn.Module, tokenizer: Any, *, data: str = "austen", text: str | None = None,
               lengths: tuple[int, ...] | list[int] = (1024, 2048),
               depths: tuple[float, ...] | list[float] = DEFAULT_DEPTHS, multi_haystacks: int = 1,
               multi_needles: int = 3, chunk: int = 128, max_new_tokens: int = 8, chat: bool | None = None,
               seed: int = 0, baseline: dict[str, Any] | None = None, fp16_only: bool = False,
               progress: Progress | None = None) -> dict[str, Any]:
    """Needle retrieval accuracy of a lowered model, quantized vs fp16 (see the module docstring).

    ``text`` overrides the haystack text (default: the eval split of ``data``). Returns ``{"fp16", "quantized",
    "delta", "metric", "n_tokens", "settings", "details", "baseline"}``: overall accuracies, and in ``details`` the
    accuracy per haystack length and kind, every question's answers, and the needles fp16 found but quantized missed.
    ``fp16_only`` answers with fp16 alone (the quantized fields are then None): a baseline to pass to later calls.
    """
    from kvcompile.eval import make_progress

    if text is None:
        from kvcompile.data import load_text

        text = load_text(data, "eval")
    if not lengths:
        raise KVCompileError("the needle task needs at least one haystack length")
    chat_mode = use_chat_template(tokenizer, chat)
    haystacks = build_haystacks(tokenizer, text, lengths=lengths, depths=depths, multi_haystacks=multi_haystacks,
                                multi_needles=multi_needles, seed=seed)
    probe = Needle("Zulu", "0000", 0.0)  # a question no haystack asks: it ends the shared prefix before any name
    groups, prefixes = [], []
    for hs in haystacks:
        ps = [prompt_ids(tokenizer, hs.text, nd, chat_mode) for nd in hs.needles]
        groups.append(ps)
        prefixes.append(min(_common_prefix([*ps, prompt_ids(tokenizer, hs.text, probe, chat_mode)]),
                            min(len(p) for p in ps) - 1))
    settings = {"lengths": [int(x) for x in lengths], "depths": [float(d) for d in depths],
                "multi_haystacks": multi_haystacks, "multi_needles": multi_needles, "chunk": chunk,
                "max_new_tokens": max_new_tokens, "chat_template": chat_mode, "seed": seed}
    digest = _digest(groups, settings)
    if baseline is not None and baseline.get("digest") != digest:
        raise KVCompileError("the fp16 needle baseline given was measured on other prompts or settings; measure again")
    n_questions = sum(len(g) for g in groups)

    own = progress is None
    prog = make_progress() if own else progress
    if fp16_only and baseline is not None:
        raise KVCompileError("fp16_only measures the baseline: do not also pass one")
    sides = [s for s in ("quantized", "fp16") if not (s == "quantized" and fp16_only)
             and not (s == "fp16" and baseline is not None)]
    answers: dict[str, list[str]] = {}
    with prog if own else nullcontext():
        for side in sides:
            task = prog.add_task(f"needle {side}", total=n_questions)
            answers[side] = [a for ps, pre in zip(groups, prefixes, strict=True)
                             for a in _answers(model, tokenizer, ps, pre, quantized=side == "quantized", chunk=chunk,
                                               max_new_tokens=max_new_tokens, progress=prog, task=task)]
    if baseline is not None:
        answers["fp16"] = list(baseline["answers"])

    if fp16_only:  # score the fp16 answers on both sides, then blank the quantized fields
        answers["quantized"] = answers["fp16"]
    rows: list[dict[str, Any]] = []
    k = 0
    for hs, ps in zip(haystacks, groups, strict=True):
        for nd, p in zip(hs.needles, ps, strict=True):
            fa, qa = answers["fp16"][k], answers["quantized"][k]
            rows.append({"length": hs.length, "kind": hs.kind, "name": nd.name, "code": nd.code, "depth": nd.depth,
                         "prompt_tokens": len(p), "fp16_answer": fa, "quantized_answer": qa,
                         "fp16_ok": extract_code(fa) == nd.code, "quantized_ok": extract_code(qa) == nd.code})
            k += 1
    by_length = {str(L): {"fp16": _accuracy(sel, "fp16"), "quantized": _accuracy(sel, "quantized"), "n": len(sel)}
                 for L in sorted({r["length"] for r in rows}) for sel in [[r for r in rows if r["length"] == L]]}
    by_kind = {kd: {"fp16": _accuracy(sel, "fp16"), "quantized": _accuracy(sel, "quantized"), "n": len(sel)}
               for kd in ("single", "multi") for sel in [[r for r in rows if r["kind"] == kd]] if sel}
    missed = [{k2: r[k2] for k2 in ("length", "kind", "name", "code", "depth", "fp16_answer", "quantized_answer")}
              for r in rows if r["fp16_ok"] and not r["quantized_ok"]]
    fp16_acc, q_acc = _accuracy(rows, "fp16"), _accuracy(rows, "quantized")
    if fp16_only:
        for r in rows:
            r["quantized_answer"] = r["quantized_ok"] = None
        for acc in (*by_length.values(), *by_kind.values()):
            acc["quantized"] = None
        missed, q_acc = [], None
    return {
        "fp16": fp16_acc,
        "quantized": q_acc,
        "delta": q_acc - fp16_acc if q_acc is not None else None,
        "metric": "needle retrieval accuracy (exact code)",
        "n_tokens": sum(r["prompt_tokens"] for r in rows),
        "settings": settings,
        "details": {"questions": len(rows), "fp16_correct": sum(r["fp16_ok"] for r in rows),
                    "quantized_correct": sum(bool(r["quantized_ok"]) for r in rows), "by_length": by_length,
                    "by_kind": by_kind, "missed": missed,
                    "gained": sum(1 for r in rows if r["quantized_ok"] and not r["fp16_ok"]), "trials": rows},
        "baseline": {"digest": digest, "answers": answers["fp16"], "accuracy": fp16_acc},
    }
