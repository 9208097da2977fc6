"""GPU check for one short lease: a Mistral-7B-shaped model with random weights, timed, in ≤ 8 minutes.

The mission's first use (`scripts/debias_llm.py --model mistral-7b`) is a GPU command, and the lent GPU
machine has torch, transformers and peft but nothing downloadable and a 64 MiB limit on what travels.
So no checkpoint: the model is built from a MistralConfig with Mistral-7B-v0.1's dimensions (32 layers,
d=4096, 32 heads / 8 KV heads, MLP 14336, V=32000), random weights, bf16, directly on the GPU, and the
tokenizer is a byte-level BPE trained here on the prompts (it only has to cover them). Random weights
make every answer meaningless; only the timings count. In one run (``eval/gpu_check.sh``):

1. scoring: the project's per-batch scorer (``refine_llm.scoring.backends.hf.HFBackend.score_batch`` with one runner, i.e. the
   few-shot prefix's KV computed once; also without the prefix cache) against the authors' loop
   (``eval/bench_scoring.paper_generate``: ``generate(max_new_tokens=10, output_scores=True)`` per
   batch of prompts, first step kept), on the same UnQover gender prompts (``refine_llm.questions`` +
   the ``paper`` template), at several batch sizes: prompts/s and the ratio ours / authors';
2. the transformers logits processor (``refine_llm.serving.hf.RefineHeadProcessor``) with a slot head
   saved for this model's tokenizer: generation time with no processor, mode ``first`` and mode ``all``;
3. bitsandbytes NF4 (the project's setting, ``models.quantization("nf4", ...)``: NF4, double
   quantization, bf16 compute on CUDA), applied in memory by swapping every decoder ``nn.Linear`` for
   the ``bnb.nn.Linear4bit`` that transformers' loader would create (lm_head stays bf16), when
   bitsandbytes imports (``gpu_check.sh`` installs a carried wheel first);
4. from those, the time to score the 600k-prompt UnQover gender set on this card.

Budget. Everything runs inside ``--budget-s`` (default 420 s, counted from process start, so with the
interpreter's start and the wheel install the script ends within 8 minutes). Stages have deadlines
at fixed fractions of it (sweep 55%, processor 70%, NF4 97%); a batch size, or a stage, whose predicted
time (from the previous batch size's per-prompt time) does not fit is skipped and named in the output;
each measurement is a warm-up batch, then 2..``--max-batches`` timed batches, stopping after
``--config-s`` seconds. Output: ``gpu_check.json`` and ``gpu_check.md`` in ``--out`` (default ``$OUT``),
rewritten after every stage; a stage that fails is recorded as ``failed: ...`` and the next one runs,
so a lease cut short still leaves what it measured.

``--smoke`` runs the same code on a 2-layer d=64 Mistral on CPU (seconds; tests/test_gpu_check.py).

    bash eval/gpu_check.sh --out /tmp/gc            # on a CUDA machine
    bash eval/gpu_check.sh --smoke --out /tmp/gc    # anywhere, < 1 minute
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here: imports of torch/transformers are part of it

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # refine_llm is not pip-installed on the GPU machine: import it from the checkout
sys.path.insert(0, str(ROOT / "eval"))  # bench_scoring: the authors' loop lives there, once

# Mistral-7B-v0.1's config.json dimensions (mistralai/Mistral-7B-v0.1), and a tiny one for --smoke.
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  sliding_window=4096, rms_norm_eps=1e-5)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            sliding_window=4096, rms_norm_eps=1e-5)
NEW_TOKENS = 10  # the authors' max_new_tokens
STAGE_END = {"sweep": 0.55, "processor": 0.70, "nf4": 0.97}  # deadlines, as fractions of the budget
WATCHED_IMPORTS = ("datasets", "trl", "gguf", "vllm", "ray", "pyarrow", "scipy", "matplotlib", "pandas",
                   "huggingface_hub", "accelerate", "peft", "bitsandbytes")
WHEEL_DIR = ROOT / ".whl"  # where `gpu_check.sh --fetch-wheel` puts the bitsandbytes wheel (ignored by git)


@dataclass
class CheckArgs:
    out: str | None = None
    smoke: bool = False
    budget_s: float = 420.0
    batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    gen_batch_size: int = 32
    prompt: str = "paper"
    top_k: int = 10
    max_batches: int = 6
    config_s: float = 10.0
    unqover_prompts: int = 600_000
    seed: int = 0


class Budget:
    """Seconds since T0 against ``total``; ``left(stage)`` is the time to that stage's deadline."""

    def __init__(self, total: float):
        self.total = total
        self.log: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def left(self, stage: str) -> float:
        return self.total * STAGE_END[stage] - self.elapsed()


# ----------------------------------------------------------------------------- model and tokenizer


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts`` (Mistral's specials: <unk>=0, <s>=1 prepended, </s>=2),
    wrapped as a transformers fast tokenizer and prepared as the project prepares every tokenizer
    (pad token, left padding). Byte-level, so any text encodes; trained on the prompts, so their words
    are mostly single tokens (the check records the prompt lengths it got)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from refine_llm.models import prepare_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return prepare_tokenizer(fast)


def build_model(dims: dict, vocab_min: int, device, dtype):
    """MistralForCausalLM with random weights, built on ``device`` (no CPU copy, no checkpoint).

    eos_token_id is None: random weights would stop a row at </s> by chance, and a real answer runs its
    10 tokens, so every generate here makes exactly NEW_TOKENS steps (checked in the processor stage)."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(**{**dims, "vocab_size": max(dims["vocab_size"], vocab_min)}, bos_token_id=1,
                        eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    with torch.device(device):  # parameters are allocated and initialised where they will run
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def to_nf4(model, device) -> dict:
    """Swap every nn.Linear of the decoder (not lm_head, as transformers' bnb loader leaves it) for a
    bitsandbytes Linear4bit with the project's NF4 settings, quantizing the weights in place on
    ``device``; return those settings. The bf16 weight of each layer is freed as it is replaced."""
    import bitsandbytes as bnb
    import torch

    from refine_llm.models import pin_unpacked_4bit, quantization

    qcfg, _ = quantization("nf4", str(device))
    for parent in list(model.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=qcfg.bnb_4bit_compute_dtype,
                                  compress_statistics=qcfg.bnb_4bit_use_double_quant,
                                  quant_type=qcfg.bnb_4bit_quant_type, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=qcfg.bnb_4bit_quant_type,
                                         compress_statistics=qcfg.bnb_4bit_use_double_quant, module=q)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q.to(device))  # .to() quantizes Params4bit (uint8 (n/2, 1) + quant_state)
    pin_unpacked_4bit(model)  # as load_model does (matters on CPU only)
    return {"quant_type": qcfg.bnb_4bit_quant_type, "double_quant": qcfg.bnb_4bit_use_double_quant,
            "compute_dtype": str(qcfg.bnb_4bit_compute_dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------- timing


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, chunks: list[list[dict]], device, budget: Budget, stage: str, args: CheckArgs) -> dict:
    """Warm-up on chunks[0] (untimed), then time fn(chunk) on chunks[1:], at least 2 and at most
    ``args.max_batches`` of them, stopping after ``args.config_s`` s or at the stage's deadline."""
    _sync(device)
    t = time.perf_counter()
    fn(chunks[0])
    _sync(device)
    warm = time.perf_counter() - t
    times, n = [], 0
    for chunk in chunks[1: 1 + args.max_batches]:
        if len(times) >= 2 and (sum(times) >= args.config_s or budget.left(stage) <= 0):
            break
        t = time.perf_counter()
        fn(chunk)
        _sync(device)
        times.append(time.perf_counter() - t)
        n += len(chunk)
    return {"prompts_per_s": n / sum(times), "prompts": n, "batches": len(times), "seconds": sum(times),
            "median_batch_s": statistics.median(times), "warmup_s": warm}


def predict_s(per_prompt_s: float, batch: int, args: CheckArgs) -> float:
    """Time ``measure`` will take at ``batch`` for a path that took ``per_prompt_s`` per prompt before:
    a warm-up batch, then timed batches until ``config_s`` (at least 2, at most ``max_batches``)."""
    t = per_prompt_s * batch
    return t * (1 + min(args.max_batches, max(2, -(-args.config_s // t)))) if t > 0 else 0.0


def chunks_of(rows: list[dict], size: int, count: int) -> list[list[dict]]:
    """``count`` consecutive batches of ``size`` rows from the start (cycling): every method at a batch
    size sees the same prompts."""
    return [[rows[(i * size + j) % len(rows)] for j in range(size)] for i in range(count)]


def _columns(chunk: list[dict]) -> dict[str, list]:
    keys = ("question_id", "context", "question", "subj1", "subj2", "subj1_group", "subj2_group", "category")
    return {k: [r[k] for r in chunk] for k in keys}


def make_scorers(model, tok, prompt, args: CheckArgs, device) -> tuple[dict, dict]:
    """name -> fn(chunk) for the three scoring paths, and facts about them (the prefix KV's time)."""
    import importlib.util

    import torch

    from bench_scoring import paper_generate
    from refine_llm.config import ScoringConfig
    from refine_llm.scoring.backends.hf import HFBackend, make_runner, score_plan
    from refine_llm.scoring.plan import finish, prompt_plan

    cfg = ScoringConfig(prompt=args.prompt, top_k=args.top_k, batch_size=max(args.batch_sizes))
    t = time.perf_counter()
    runner = make_runner(model, tok, prompt, cfg)  # the prefix's KV, once for the whole run
    _sync(device)
    facts = {"prefix_kv_s": time.perf_counter() - t, "prefix_tokens": len(runner.prefix_ids)}
    no_prefix = ScoringConfig(prompt=args.prompt, top_k=args.top_k, batch_size=cfg.batch_size, prefix_cache=False)
    arrow = importlib.util.find_spec("pyarrow") is not None
    facts["path"] = "HFBackend.score_batch" if arrow else "prompt_plan/score_plan/finish (no pyarrow here)"

    def ours(c: ScoringConfig):
        def run(chunk):
            rows = _columns(chunk)
            with torch.inference_mode():
                if arrow:
                    return HFBackend(model, tok, prompt, c, runner).score_batch(rows)
                # score_batch without its last step (the Arrow table), for a machine without pyarrow
                plan = prompt_plan(tok, rows, prompt, c)
                return finish(plan, score_plan(model, plan, c, runner), c.store_hidden)
        return run

    def authors(chunk):
        texts = [prompt.render(r["context"], r["question"], tok) for r in chunk]
        return paper_generate(model, tok, texts, len(texts), args.top_k)

    return {"authors_generate": authors, "ours_no_prefix_cache": ours(no_prefix), "ours_prefix_cache": ours(cfg)}, facts


def sweep(scorers: dict, rows: list[dict], device, budget: Budget, args: CheckArgs, stage: str = "sweep",
          sizes: list[int] | None = None) -> dict:
    """Each batch size in turn, each path at it on the same prompts; a batch size whose predicted time
    (per-prompt times at the previous size x its prompts) passes the stage's deadline is skipped."""
    import torch

    out, skipped, oom, per_prompt = [], [], [], {}
    for b in sizes or args.batch_sizes:
        predicted = sum(predict_s(s, b, args) for s in per_prompt.values())
        if budget.left(stage) <= 0 or predicted > budget.left(stage) or (oom and b >= min(oom)):
            (oom if oom and b >= min(oom) else skipped).append(b)
            continue
        row: dict = {"batch_size": b}
        chunks = chunks_of(rows, b, args.max_batches + 1)
        try:
            for name, fn in scorers.items():
                row[name] = measure(fn, chunks, device, budget, stage, args)
                per_prompt[name] = row[name]["seconds"] / row[name]["prompts"]
        except torch.cuda.OutOfMemoryError:  # this size and larger ones do not fit: keep what did
            row = {}
            torch.cuda.empty_cache()
            oom.append(b)
            print(f"[{budget.elapsed():6.1f}s] {stage} batch {b}: out of GPU memory", flush=True)
            continue
        a = row["authors_generate"]["prompts_per_s"]
        row["ratio_ours_vs_authors"] = row["ours_prefix_cache"]["prompts_per_s"] / a
        if "ours_no_prefix_cache" in row:
            row["ratio_ours_no_prefix_vs_authors"] = row["ours_no_prefix_cache"]["prompts_per_s"] / a
        out.append(row)
        print(f"[{budget.elapsed():6.1f}s] {stage} batch {b}: " + ", ".join(
            f"{k} {v['prompts_per_s']:.1f}/s" for k, v in row.items() if isinstance(v, dict)), flush=True)
    return {"by_batch_size": out, "skipped_batch_sizes": skipped, "oom_batch_sizes": oom}


# ----------------------------------------------------------------------------- processor


def processor_overhead(model, tok, prompt, rows, device, budget: Budget, args: CheckArgs, head_dir: Path) -> dict:
    """generate(max_new_tokens=10) on the same batches with no processor, RefineHeadProcessor mode
    ``first`` and mode ``all``, interleaved batch by batch (the order rotates) so drift hits all three."""
    import torch
    from transformers import LogitsProcessorList

    from refine_llm.serving.hf import RefineHeadProcessor

    b = args.gen_batch_size
    procs = {"none": None, "first": RefineHeadProcessor(head_dir, mode="first", tokenizer=tok, device=device),
             "all": RefineHeadProcessor(head_dir, mode="all", tokenizer=tok, device=device)}
    facts: dict = {"batch_size": b, "head": "slot (k=%d)" % args.top_k, "new_tokens": None, "rows_rewritten_first": None}

    def gen(chunk, name):
        texts = [prompt.render(r["context"], r["question"], tok) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True).to(device)
        proc = procs[name]
        if proc is not None:
            proc.reset()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                                 logits_processor=LogitsProcessorList([proc]) if proc is not None else None)
        facts["new_tokens"] = int(out.sequences.shape[1] - enc["input_ids"].shape[1])
        if name == "first":
            facts["rows_rewritten_first"] = int(proc.applied[0].sum())  # (B,) bool of the first step
        return out

    chunks = chunks_of(rows, b, args.max_batches + 1)
    names = list(procs)
    for n in names:  # warm-up, untimed
        gen(chunks[0], n)
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, chunk in enumerate(chunks[1:]):
        spent = sum(sum(v) for v in times.values())
        if i >= 2 and (spent >= 3 * args.config_s or budget.left("processor") <= 0):
            break
        for n in names[i % 3:] + names[: i % 3]:
            t = time.perf_counter()
            gen(chunk, n)
            _sync(device)
            times[n].append(time.perf_counter() - t)
    base = statistics.median(times["none"])
    res = {n: {"median_batch_s": statistics.median(v), "batches": len(v),
               "prompts_per_s": b / statistics.median(v)} for n, v in times.items()}
    for n in ("first", "all"):
        m = res[n]["median_batch_s"]
        res[n]["overhead_pct"] = 100 * (m - base) / base
        res[n]["overhead_ms_per_step"] = 1000 * (m - base) / NEW_TOKENS
    print(f"[{budget.elapsed():6.1f}s] processor batch {b}: " + ", ".join(
        f"{n} {r['median_batch_s'] * 1000:.1f} ms" for n, r in res.items()), flush=True)
    return {"status": "ran", **facts, **res}


def save_slot_head(model, tok, out_dir: Path, k: int) -> Path:
    """A slot head for this model and tokenizer (codes from its lm_head, the gender vocabulary as its
    category), saved as training saves one; its MLP's last layer is zero as built, which costs the same
    as a trained head's."""
    from refine_llm.config import HeadConfig
    from refine_llm.head import build_head, save_head, tokenizer_fingerprint
    from refine_llm.questions import category_vocabulary
    from refine_llm.vocab import gate_token_ids

    head = build_head(HeadConfig(variant="slot", k=k), lm_head_weight=model.get_output_embeddings().weight, seed=0)
    gate = gate_token_ids(tok, category_vocabulary("gender"))
    head.set_category_vocabulary(gate)
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tok), "base_model": "random mistral-7b-shaped",
            "category": "gender", "gate_token_ids": gate}
    return save_head(head, out_dir, meta)


# ----------------------------------------------------------------------------- NF4


def bnb_status() -> str | None:
    """None when bitsandbytes imports, else why the NF4 stage does not run (one line)."""
    skip = WHEEL_DIR / "bitsandbytes.skip"  # written by `gpu_check.sh --fetch-wheel` when the wheel did not fit
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA library it cannot load
        if skip.is_file():
            return skip.read_text().strip()
        if not list(WHEEL_DIR.glob("bitsandbytes-*.whl")):
            return ("not run: bitsandbytes is not installed and no wheel was carried "
                    "(run `bash eval/gpu_check.sh --fetch-wheel` first and carry .whl)")
        return f"not run: bitsandbytes does not import ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    return None


def wheel_facts() -> dict:
    w = sorted(WHEEL_DIR.glob("bitsandbytes-*.whl"))
    return {"wheel": w[0].name, "wheel_mib": round(w[0].stat().st_size / 2**20, 1)} if w else {}


# ----------------------------------------------------------------------------- report


def estimate(result: dict, n: int) -> dict:
    """Hours to score ``n`` prompts at each path's best measured prompts/s (first-token mode, one GPU,
    model load excluded)."""
    rows = []
    for label, sec in (("bf16", result.get("scoring")), ("nf4", result.get("nf4"))):
        for row in (sec or {}).get("by_batch_size", []):
            for name, m in row.items():
                if isinstance(m, dict) and "prompts_per_s" in m:
                    rows.append((f"{name} ({label})", row["batch_size"], m["prompts_per_s"]))
    best: dict[str, tuple[int, float]] = {}
    for name, b, r in rows:
        if name not in best or r > best[name][1]:
            best[name] = (b, r)
    return {"prompts": n, "paths": [{"path": k, "batch_size": b, "prompts_per_s": r, "seconds": n / r,
                                      "hours": n / r / 3600} for k, (b, r) in best.items()]}


def _sweep_table(sec: dict, paths: list[tuple[str, str]]) -> list[str]:
    """Markdown rows of a sweep (``paths``: (json key, column title)), or the stage's status line."""
    if not sec.get("by_batch_size"):
        return [sec.get("status", "not run") if sec.get("status") != "ran" else "no batch size fitted the budget"]
    lines = ["| batch | " + " | ".join(t for _, t in paths) + " | ratio |", "|---:|" + "---:|" * (len(paths) + 1)]
    for r in sec["by_batch_size"]:
        lines.append(f"| {r['batch_size']} | " + " | ".join(f"{r[k]['prompts_per_s']:.1f}" for k, _ in paths)
                     + f" | x{r['ratio_ours_vs_authors']:.1f} |")
    if sec.get("skipped_batch_sizes"):
        lines += ["", f"Skipped for the budget: batch sizes {sec['skipped_batch_sizes']}."]
    if sec.get("oom_batch_sizes"):
        lines += ["", f"Out of GPU memory: batch sizes {sec['oom_batch_sizes']}."]
    return lines


def markdown(res: dict) -> str:
    """The same facts as the JSON, as tables for the README (a stage that failed or did not run says why)."""
    m, tk, sc = res.get("model", {}), res.get("tokenizer", {}), res.get("scoring", {})
    params = f"{m['params'] / 1e9:.2f} B" if m.get("params", 0) >= 1e8 else f"{m.get('params', 0) / 1e6:.2f} M"
    b = res.get("budget", {})
    lines = [f"# GPU check: {res['card']}", ""]
    if res.get("smoke"):
        lines += ["SMOKE (tiny model on CPU): not GPU numbers.", ""]
    if not res.get("complete"):
        lines += ["PARTIAL: the run stopped before its last stage; the stages below are those that finished.", ""]
    lines += [f"Model: Mistral-{'tiny' if res.get('smoke') else '7B'}-shaped, random weights, {m.get('dtype')}, "
              f"{params} parameters, built in {m.get('build_s', 0):.1f} s. Prompt `{res['args']['prompt']}`, "
              f"{tk.get('prompt_tokens_mean', 0):.0f} tokens per prompt ({tk.get('prefix_tokens')} of them the shared "
              f"prefix, {tk.get('kind')}), top-k {res['args']['top_k']}. torch {res['versions']['torch']}, transformers "
              f"{res['versions']['transformers']}. {b.get('elapsed_s', 0):.0f} s of a {b.get('budget_s', 0):.0f} s budget"
              + (f", peak GPU memory {res['max_memory_allocated_gib']:.1f} GiB." if "max_memory_allocated_gib" in res else "."),
              "", "## Scoring (prompts/s; ratio = ours with the prefix cache / the authors' generate loop)", ""]
    lines += _sweep_table(sc, [("authors_generate", "authors' generate(10)"), ("ours_no_prefix_cache", "ours, no prefix cache"),
                               ("ours_prefix_cache", "ours, prefix cache")])
    p = res.get("processor", {"status": "not run"})
    lines += ["", "## RefineHeadProcessor in generate(max_new_tokens=10)", ""]
    if p.get("status") == "ran":
        lines += [f"Batch {p['batch_size']}, {p['head']} head, {p['new_tokens']} new tokens per row; "
                  f"mode `first` rewrote {p['rows_rewritten_first']} of {p['batch_size']} rows at step 0.", "",
                  "| processor | median s / batch | prompts/s | overhead |", "|---|---:|---:|---:|"]
        for n in ("none", "first", "all"):
            o = f"{p[n]['overhead_pct']:+.1f}% ({p[n]['overhead_ms_per_step']:+.2f} ms/step)" if n != "none" else "-"
            lines.append(f"| {n} | {p[n]['median_batch_s']:.4f} | {p[n]['prompts_per_s']:.1f} | {o} |")
    else:
        lines.append(p["status"])
    q = res.get("nf4", {"status": "not run"})
    lines += ["", "## bitsandbytes NF4", ""]
    if q.get("status") == "ran":
        wheel = f", carried as {q['wheel']} ({q['wheel_mib']} MiB)" if q.get("wheel") else ""
        st = q["settings"]
        lines += [f"{st['quant_type'].upper()}{', double quantization' if st['double_quant'] else ''}, compute "
                  f"{st['compute_dtype']} (models.quantization), lm_head and embeddings bf16, quantized in {q['quantize_s']:.1f} s; bitsandbytes {q['bitsandbytes']}{wheel}.", ""]
    lines += _sweep_table(q, [("authors_generate", "authors' generate(10)"), ("ours_prefix_cache", "ours, prefix cache")])
    e = res.get("estimate_unqover_gender", {"prompts": 0, "paths": []})
    lines += ["", f"## Estimate: {e['prompts']:,} UnQover gender prompts on this card (one GPU, first-token mode, "
                  "model load excluded)", ""]
    if e["paths"]:
        lines += ["| path | batch | prompts/s | time |", "|---|---:|---:|---:|"]
        for r in sorted(e["paths"], key=lambda r: -r["prompts_per_s"]):
            t = f"{r['hours']:.2f} h" if r["hours"] >= 1 else f"{r['seconds'] / 60:.1f} min"
            lines.append(f"| {r['path']} | {r['batch_size']} | {r['prompts_per_s']:.1f} | {t} |")
    else:
        lines.append("no measurement to estimate from")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def _run_stage(res: dict, key: str, fn, write) -> None:
    """res[key] = fn(); a failure is recorded (and its traceback printed) instead of ending the run, and
    the files are rewritten after every stage: a lease is too short to lose the stages that worked."""
    try:
        res[key] = fn()
    except Exception as e:  # noqa: BLE001 (any failure of one stage; the others still run)
        traceback.print_exc()
        res[key] = {"status": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    write()


def main(args: CheckArgs) -> dict:
    import torch
    import transformers

    from refine_llm.config import QuestionsConfig
    from refine_llm.prompts import load_prompt
    from refine_llm.questions import question_rows

    budget = Budget(args.budget_s)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        from refine_llm.errors import UserError

        raise UserError("no CUDA device here: run on a GPU machine, or pass --smoke for the CPU check")
    if args.smoke:  # a d=64 model gains nothing from threads, and on a shared busy CPU they spin: 5x slower
        torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}), smoke"
    res: dict = {"card": card, "smoke": args.smoke, "device": device.type, "complete": False, "args": asdict(args),
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "python": platform.python_version()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        res["estimate_unqover_gender"] = estimate(res, args.unqover_prompts)
        if device.type == "cuda":
            res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["budget"] = {"budget_s": args.budget_s, "elapsed_s": budget.elapsed(), **budget.log}
        (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "gpu_check.md").write_text(markdown(res))

    # Prompts: the gender questions (every split, underspecified and specified), the paper template.
    rows = question_rows(QuestionsConfig(category="gender", seed=args.seed))
    prompt = load_prompt(args.prompt)
    texts = [prompt.render(r["context"], r["question"]) for r in rows]
    tok = build_tokenizer(texts[::4], vocab_size=8000)
    lens = [len(x) for x in tok(texts[:256])["input_ids"]]
    res["tokenizer"] = {"kind": "byte-level BPE trained on the prompts", "vocab": len(tok),
                        "prompt_tokens_mean": sum(lens) / len(lens), "prompt_tokens_max": max(lens),
                        "prefix_tokens": len(tok(prompt.prefix(tok))["input_ids"]), "questions": len(rows)}

    t = time.perf_counter()
    try:
        model = build_model(TINY if args.smoke else MISTRAL_7B, len(tok), device, torch.bfloat16)
        _sync(device)
    except Exception as e:  # nothing else can run: leave the reason in the files, then fail
        res["model"] = {"status": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        write()
        raise
    res["model"] = {"shape": "tiny (smoke)" if args.smoke else "Mistral-7B-v0.1", "dtype": "bfloat16",
                    "params": sum(p.numel() for p in model.parameters()), "build_s": time.perf_counter() - t,
                    "attn_implementation": model.config._attn_implementation, **(TINY if args.smoke else MISTRAL_7B)}
    print(f"[{budget.elapsed():6.1f}s] {card}: model built in {res['model']['build_s']:.1f} s", flush=True)

    def scoring_stage() -> dict:  # 1. the scoring sweep, bf16
        scorers, facts = make_scorers(model, tok, prompt, args, device)
        return {"status": "ran", "prompt": args.prompt, "top_k": args.top_k, **facts,
                **sweep(scorers, rows, device, budget, args)}

    _run_stage(res, "scoring", scoring_stage, write)
    budget.log["sweep_end_s"] = budget.elapsed()

    def processor_stage() -> dict:  # 2. the logits processor's overhead in generate
        if budget.left("processor") <= 0:
            return {"status": f"not run: budget spent ({budget.elapsed():.0f} s of {args.budget_s:.0f} s)"}
        with tempfile.TemporaryDirectory() as d:
            head_dir = save_slot_head(model, tok, Path(d) / "slot", args.top_k)
            return processor_overhead(model, tok, prompt, rows, device, budget, args, head_dir)

    _run_stage(res, "processor", processor_stage, write)
    budget.log["processor_end_s"] = budget.elapsed()

    def nf4_stage() -> dict:  # 3. NF4 (last: it replaces the bf16 weights)
        why = bnb_status()
        if why is None and budget.left("nf4") < (5 if args.smoke else 45):
            why = f"not run: budget spent ({budget.elapsed():.0f} s of {args.budget_s:.0f} s)"
        if why is not None:
            return {"status": why, **wheel_facts()}
        import bitsandbytes

        t = time.perf_counter()
        settings = to_nf4(model, device)
        _sync(device)
        qs = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.empty_cache()
        scorers, facts = make_scorers(model, tok, prompt, args, device)
        scorers.pop("ours_no_prefix_cache")
        sizes = sorted({args.gen_batch_size, max(args.batch_sizes)})  # the processor's batch and the largest
        return {"status": "ran", "settings": settings, "quantize_s": qs, "bitsandbytes": bitsandbytes.__version__,
                **wheel_facts(), **facts, **sweep(scorers, rows, device, budget, args, "nf4", sizes)}

    _run_stage(res, "nf4", nf4_stage, write)
    print(f"[{budget.elapsed():6.1f}s] nf4: {res['nf4']['status']}", flush=True)
    # What the run pulled in, of the packages a GPU image may lack (KINDS.md: datasets, trl and gguf are
    # not on it; the rest are): tests/test_gpu_check.py runs --smoke with the missing ones blocked.
    res["imported"] = sorted(m for m in WATCHED_IMPORTS if m in sys.modules)
    res["complete"] = True
    write()
    print(markdown(res))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {budget.elapsed():.0f} s", flush=True)
    return res


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return v


def _parser():
    from refine_llm.errors import ArgumentParser  # one-line errors, exit 2

    d = CheckArgs()
    p = ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="directory for gpu_check.json and gpu_check.md (default: $OUT)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: the same code, in seconds")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for the whole run, from process start (default {d.budget_s:.0f}; --smoke 180, room for slow imports on busy cores)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help="scoring batch sizes, in order (default 16,32,64,128,256; --smoke 2,4)")
    p.add_argument("--gen-batch-size", type=int, default=None, help="batch of the processor stage and NF4's first (default 32; --smoke 2)")
    p.add_argument("--prompt", default=d.prompt, help="prompt template (paper, qa)")
    p.add_argument("--max-batches", type=int, default=d.max_batches,
                   help=f"timed batches per measurement, at most (default {d.max_batches}; --smoke 2)")
    p.add_argument("--config-s", type=float, default=None,
                   help=f"seconds per measurement before it stops (default {d.config_s:.0f}; --smoke 0.5)")
    p.add_argument("--unqover-prompts", type=int, default=d.unqover_prompts, help="size of the set to estimate for")
    return p


def parse(argv: list[str] | None = None) -> CheckArgs:
    from refine_llm.errors import UserError

    p = _parser()
    a = p.parse_args(argv)
    if a.out is None:
        p.error("give --out DIR (or set OUT): where gpu_check.json and gpu_check.md go")
    if a.prompt == "chat":
        p.error("--prompt chat needs a chat template, which the tokenizer built here has none of: use paper or qa")
    for name in ("budget_s", "gen_batch_size", "max_batches", "config_s", "unqover_prompts"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if a.max_batches < 2:
        p.error(f"--max-batches must be >= 2 (a median of one batch is noise), got {a.max_batches}")
    try:
        from refine_llm.prompts import load_prompt

        load_prompt(a.prompt)
    except UserError as e:
        p.error(str(e))
    # --smoke: the same stages at the smallest sizes that still exercise them (two batch sizes, two
    # timed batches each), so that the CPU check stays well under a minute on a busy 2-core machine.
    smoke, d = a.smoke, CheckArgs()
    return CheckArgs(out=a.out, smoke=smoke, budget_s=a.budget_s or (180.0 if smoke else d.budget_s),
                     batch_sizes=a.batch_sizes or ([2, 4] if smoke else d.batch_sizes),
                     gen_batch_size=a.gen_batch_size or (2 if smoke else d.gen_batch_size),
                     prompt=a.prompt, max_batches=2 if smoke else a.max_batches,
                     config_s=a.config_s if a.config_s is not None else (0.5 if smoke else d.config_s),
                     unqover_prompts=a.unqover_prompts)


if __name__ == "__main__":
    from refine_llm.errors import UserError

    try:
        main(parse())
    except UserError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        sys.exit(2)
