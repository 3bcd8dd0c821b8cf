"""Fine-tune splade-tiny on BEIR SciFact and compare it with BM25 and the zero-shot model (docs/benchmarks.md).

    python benchmarks/scifact.py tune --variants "lr=1e-4,n_negatives=4,epochs=1" "lr=5e-5,n_negatives=4,epochs=1"
    python benchmarks/scifact.py final --variant "lr=1e-4,n_negatives=4,lambda_scale=0,epochs=1,max_doc_length=512" \
        --plot curves.png
    python benchmarks/scifact.py all --plot docs/img/scifact-curves.png   # both, with the settings tune chose

`tune` never reads the test qrels. It holds out 20% of the train queries (chosen by a stable hash of their ids) as
dev, trains on the rest for each variant (settings over the shared ones below), evaluates dev after every epoch and
prints the best (variant, epochs) by dev nDCG@10. `final` trains on every train query in 32-true and in bf16-mixed
with those settings, then evaluates BM25, zero-shot splade-tiny and both fine-tunes on test, prints a markdown
table, writes results.json and a plot of the training curves. Tuning and evaluation run in bf16-mixed where the CPU
has native bf16, else in 32-true; the bf16-mixed fine-tune always trains in bf16-mixed (emulated in float32 on CPUs
without native bf16, see docs/training.md). SciFact is read from ../shared/data/scifact (or $SPLADECTL_SCIFACT);
nothing is copied into the repository: the carved dev split and the runs live under --work-dir.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("SPLADECTL_SCIFACT", HERE.parent.parent / "shared" / "data" / "scifact"))
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spladectl" / "scifact-benchmark"

# Shared by every run so that only the named knobs differ.
COMMON = dict(model="splade-tiny", batch_size=16, grad_accum=1, n_negatives=1, max_query_length=64,
              max_doc_length=256, warmup_ratio=0.1, scheduler="linear", seed=42, dataloader_workers=1, epochs=2)


# What `tune` tries by default; the first is the setting the final SciFact run used (docs/benchmarks.md).
RECIPE = "lr=1e-4,n_negatives=4,lambda_scale=0,epochs=1"
DEFAULT_VARIANTS = [f"{RECIPE},max_doc_length=512", RECIPE, f"{RECIPE},skip_negatives=3"]


@functools.cache  # the machine does not change; detect() reads /proc and probes torch, once is enough
def fast_precision() -> str:
    """bf16-mixed where this machine has native bf16, else 32-true: what tuning and every evaluation run in."""
    from spladectl.hardware import detect

    return "bf16-mixed" if detect().has_bf16 else "32-true"


def is_dev(query_id: str) -> bool:
    return int(hashlib.sha1(query_id.encode()).hexdigest(), 16) % 5 == 0


def carve_dev(data: Path, work: Path, name: str = "scifact-dev") -> Path:
    """A BEIR dir with train (80% of the train queries) and dev (the other 20%) qrels; test is not copied."""
    from spladectl.data.beir import load_beir, write_beir

    out = work / name
    if (out / "qrels" / "dev.tsv").is_file():
        return out
    train = load_beir(data, "train")
    qrels = {"train": {q: d for q, d in train.qrels.items() if not is_dev(q)},
             "dev": {q: d for q, d in train.qrels.items() if is_dev(q)}}
    corpus = {doc_id: {"title": train.titles.get(doc_id, ""), "text": _text_only(train, doc_id)}
              for doc_id in train.corpus}
    write_beir(out, corpus, train.queries, qrels)
    return out


def _text_only(dataset, doc_id: str) -> str:
    # load_beir joins title and text; write the text back without the title so that re-reading joins them once.
    title, joined = dataset.titles.get(doc_id, ""), dataset.corpus[doc_id]
    return joined[len(title) + 1:] if title and joined.startswith(title + " ") else joined


SPECIAL = {"lambda_scale", "skip_negatives"}


def parse_variant(text: str) -> dict:
    """'lr=1e-4,n_negatives=4,lambda_scale=0' -> settings on top of COMMON.

    Keys are TrainConfig fields, plus lambda_scale (multiplies the default λq 5e-4 / λd 3e-4) and skip_negatives
    (drop the N best-ranked BM25 negatives of every query, which are the likeliest unjudged positives)."""
    from spladectl.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        key = key.strip()
        if key not in fields and key not in SPECIAL:
            sys.exit(f"variant {text!r}: unknown setting {key!r}")
        default = getattr(TrainConfig(), key, None)
        kind = {"lambda_scale": float, "skip_negatives": int}.get(key) or (int if default is None else type(default))
        out[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
    return out


def variant_name(settings: dict) -> str:
    return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in settings.items()) or "defaults"


def train_run(data: Path, split: str, out: Path, *, precision: str, settings: dict, eval_data: Path | None = None,
              eval_split: str = "dev", eval_doc_length: int = 512) -> dict:
    from spladectl.config import TrainConfig
    from spladectl.data import load_training_data
    from spladectl.engine import Trainer
    from spladectl.data.beir import load_beir
    from spladectl.evaluate import evaluate_encoder
    from spladectl.plugin_loading import load_plugins

    settings = dict(settings)
    scale, skip = settings.pop("lambda_scale", 1.0), settings.pop("skip_negatives", 0)
    # Unstemmed BM25 mining, whether or not PyStemmer is installed, so every run sees the same negatives.
    examples = load_training_data(str(data), split=split, show_progress=False, stem=False)
    for example in examples:
        example.negatives = example.negatives[skip:]
    config = TrainConfig(**{**COMMON, **settings}, data=str(data), output_dir=str(out), precision=precision)
    config.lambda_q *= scale
    config.lambda_d *= scale
    eval_fn = None
    if eval_data is not None:
        dev = load_beir(eval_data, eval_split)
        eval_fn = functools.partial(evaluate_encoder, dataset=dev, precision=fast_precision(),
                                    max_doc_length=eval_doc_length, show_progress=False)
    trainer = Trainer(config, examples, pm=load_plugins(), eval_fn=eval_fn, log=lambda m: print(m, file=sys.stderr))
    if eval_fn is not None:
        config.eval_every = trainer.state.steps_per_epoch
    started = time.perf_counter()
    result = trainer.fit()
    result["train_minutes"] = round((time.perf_counter() - started) / 60, 2)
    result["examples"] = len(examples)
    return result


def tune(args):
    from spladectl.data.beir import load_beir
    from spladectl.evaluate import evaluate_encoder
    from spladectl.model import SpladeEncoder

    dev_dir = carve_dev(args.data, args.work)
    zero_file = args.work / f"zero-shot-dev-{args.eval_doc_length}.json"
    if not zero_file.is_file():
        zero = evaluate_encoder(SpladeEncoder.from_pretrained("splade-tiny"), load_beir(dev_dir, "dev"),
                                precision=fast_precision(), max_doc_length=args.eval_doc_length, show_progress=False)
        zero_file.write_text(json.dumps(zero))
    zero = json.loads(zero_file.read_text())
    print(f"zero-shot splade-tiny: dev nDCG@10 {zero['nDCG@10']:.4f}", flush=True)
    results = {}
    for text in args.variants:
        settings = parse_variant(text)
        epochs = settings.get("epochs", COMMON["epochs"])
        out = args.work / f"tune-{variant_name(settings)}-eval{args.eval_doc_length}"
        eval_file = out / "eval.jsonl"
        done = eval_file.is_file() and len(eval_file.read_text().splitlines()) == epochs and (out / "final").is_dir()
        if not done:  # a finished run is reused, so an interrupted tune picks up where it stopped
            train_run(dev_dir, "train", out, precision=fast_precision(), settings=settings, eval_data=dev_dir,
                      eval_doc_length=args.eval_doc_length)
        evals = [json.loads(line) for line in eval_file.read_text().splitlines()]
        results[text] = [round(e["nDCG@10"], 4) for e in evals]
        print(f"{text}: dev nDCG@10 after each epoch {results[text]}", flush=True)
    best = max(((text, i + 1, ndcg) for text, rows in results.items() for i, ndcg in enumerate(rows)),
               key=lambda t: t[2])
    summary = {"zero_shot_dev_nDCG@10": zero["nDCG@10"], "dev_nDCG@10_by_epoch": results,
               "best": {"variant": best[0], "epochs": best[1], "dev_nDCG@10": best[2]}}
    (args.work / "tune.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    chosen = {**parse_variant(best[0]), "epochs": best[1]}
    return ",".join(f"{k}={v}" for k, v in chosen.items())


def final(args) -> None:
    from spladectl.data.beir import load_beir
    from spladectl.evaluate import bm25_baseline, evaluate_encoder
    from spladectl.model import SpladeEncoder

    test = load_beir(args.data, "test")
    rows = []

    def row(name, metrics, minutes=None):
        rows.append({"name": name, **{k: metrics.get(k) for k in ("nDCG@10", "MRR@10", "R@100", "avg_query_dims",
                                                                "avg_doc_dims", "avg_flops")},
                     "train_minutes": minutes})
        print(json.dumps(rows[-1]), flush=True)

    for stem in (False, True):
        row(f"BM25 (bm25s{', stemmed' if stem else ''})", bm25_baseline(test, stem=stem))
    evaluate = functools.partial(evaluate_encoder, dataset=test, precision=fast_precision(),
                                 max_doc_length=args.eval_doc_length, show_progress=False)
    row("splade-tiny zero-shot", evaluate(SpladeEncoder.from_pretrained("splade-tiny")))
    for precision in ("32-true", "bf16-mixed"):
        out = args.work / f"final-{precision}"
        result = train_run(args.data, "train", out, precision=precision, settings=parse_variant(args.variant))
        model = SpladeEncoder.from_pretrained(result["final"])
        row(f"splade-tiny fine-tuned, {precision}", evaluate(model), result["train_minutes"])
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    if args.plot:
        plot_curves(args.work, args.plot)


def markdown(rows: list[dict]) -> str:
    lines = ["| run | nDCG@10 | MRR@10 | R@100 | query dims | doc dims | FLOPS | training minutes |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=4: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['name']} | {fmt(r['nDCG@10'])} | {fmt(r['MRR@10'])} | {fmt(r['R@100'])} | "
                     f"{fmt(r['avg_query_dims'], 1)} | {fmt(r['avg_doc_dims'], 1)} | {fmt(r['avg_flops'], 2)} | "
                     f"{fmt(r['train_minutes'], 1)} |")
    return "\n".join(lines)


def plot_curves(work: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for precision in ("32-true", "bf16-mixed"):
        rows = [json.loads(x) for x in (work / f"final-{precision}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=precision, alpha=0.8)
        axes[1].plot(steps, [r["query_dims"] for r in rows], label=f"query, {precision}")
        axes[1].plot(steps, [r["doc_dims"] for r in rows], label=f"document, {precision}", linestyle="--")
        axes[2].plot(steps, [r["lambda_d"] for r in rows], label=f"λd, {precision}")
    axes[0].set(title="training loss", xlabel="optimizer step")
    axes[1].set(title="active dimensions", xlabel="optimizer step")
    axes[2].set(title="FLOPS weight (document)", xlabel="optimizer step")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["tune", "final", "all"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work-dir", dest="work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help="tune: settings to try, each 'key=value,...' over the shared ones (TrainConfig fields, "
                             "lambda_scale, skip_negatives); dev is evaluated after every epoch")
    parser.add_argument("--variant", default=None, help="final: the settings tune chose (epochs included)")
    parser.add_argument("--eval-doc-length", type=int, default=512,
                        help="documents are truncated to this many tokens when evaluating (dev and test); training "
                             "uses the variant's max_doc_length (256 unless set)")
    parser.add_argument("--plot", type=Path, default=None, help="final: write the training curves here (PNG)")
    args = parser.parse_args()
    if not (args.data / "corpus.jsonl").is_file():
        sys.exit(f"SciFact not found at {args.data} (set SPLADECTL_SCIFACT)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "all":  # tune, then train and test once with what dev chose
        args.variant = tune(args)
        final(args)
    elif args.stage == "final" and args.variant is None:
        sys.exit("final needs --variant (what tune chose; see WORK/tune.json)")
    else:
        {"tune": tune, "final": final}[args.stage](args)


if __name__ == "__main__":
    main()
