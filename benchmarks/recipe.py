"""Run a recipe (recipes/*.toml) on a BEIR directory, over several seeds, with ablations, as a user would: through the
`spladectl data mine`, `data score`, `train` and `eval` commands. Results go to WORK/results.jsonl and a markdown table.

    python benchmarks/recipe.py dev  --data ../shared/data/scifact --seeds 1 2 3            # tune on a carved dev
    python benchmarks/recipe.py dev  --data ../shared/data/scifact --ablations distill bm25-negatives
    python benchmarks/recipe.py test --data ../shared/data/scifact --seeds 1 2 3            # once, at the end

`dev` carves 20% of the train queries (by a SHA-1 of their ids, as benchmarks/scifact.py does) into a dev split, runs
the recipe on the other 80% and evaluates dev; it never reads the test qrels. `test` runs the recipe on every train
query and evaluates test, beside zero-shot splade-tiny and both BM25 rows from one `spladectl eval --baseline` call.
A finished step (mined file, scored file, trained model, evaluation) is reused when run again.

Ablations change one lever of the recipe each (see ABLATIONS), to show what it contributes, or what one it leaves
out would have.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scifact import carve_dev  # noqa: E402

DEFAULT_RECIPE = HERE.parent / "recipes" / "beir.toml"
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spladectl" / "recipe-benchmark"


TEACHER = {"teacher": ["splade-tiny=0.4", "bm25:stem=0.6"], "max-doc-length": 512}


def _distill(r):
    """Add the ensemble's scores and MarginMSE (in splade-tiny's units, so margins compare)."""
    r["score"] = dict(TEACHER)
    r["train"]["distillation"] = "margin-mse"


def _distill_kl(r):
    r["score"] = dict(TEACHER)
    r["train"]["distillation"] = "kl"


def _bm25_negatives(r):
    r["mine"]["rank-by"] = ["bm25:stem"]


def _flops(r):
    r["train"].update({"lambda-q": 5e-4, "lambda-d": 3e-4})


def _previous(r):
    """The recipe before this one: BM25 (unstemmed) negatives, 1 epoch of SciFact."""
    r["mine"] = {"rank-by": ["bm25:nostem"], "k": 50, "max-positives": r["mine"].get("max-positives")}
    r["train"]["max-steps"] = r["train"]["max-steps"] // 2


FIRST_ROUND = "{recipe-model}"  # in a mining option: the recipe's own seed-1 model of the same stage


def _second_round(r):
    """Negatives mined again, by the recipe's fine-tuned model (seed 1) fused with stemmed BM25, then trained from
    the zero-shot model as before: harder negatives from a model that already knows the set."""
    r["mine"]["rank-by"] = [f"{FIRST_ROUND}=0.5", "bm25:stem=0.5"]


def _longer(r):
    """Twice the steps (5 epochs of SciFact): does the recipe stop before the model has learnt what it can?"""
    r["train"]["max-steps"] = r["train"]["max-steps"] * 2


ABLATIONS = {"second-round": _second_round, "longer": _longer, "distill": _distill, "distill-kl": _distill_kl, "bm25-negatives": _bm25_negatives, "flops": _flops,
             "previous": _previous}


def load_recipe(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


def options(table: dict) -> list[str]:
    """A recipe table as command-line options: lists repeat the option, booleans are flags."""
    out: list[str] = []
    for key, value in table.items():
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool):
                out.append(f"--{key}" if item else f"--no-{key}")
            else:
                out += [f"--{key}", str(item)]
    return out


def spladectl(*args: str, log: Path) -> str:
    command = [str(Path(sys.executable).with_name("spladectl")), *args]
    print("$ " + " ".join(command[1:]), flush=True)
    with open(log, "a") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): spladectl {' '.join(args)}; see {log}")
    return done.stdout


def run_recipe(recipe: dict, data: Path, eval_split: str, seed: int, work: Path, log: Path) -> dict:
    """mine -> score -> train -> eval; each step's output is kept in `work` and reused when present."""
    work.mkdir(parents=True, exist_ok=True)
    mined = work / "mined.jsonl"
    if not mined.is_file():
        first_round = work.parent / "recipe" / "seed1" / "final"
        mine = [arg.replace(FIRST_ROUND, str(first_round)) for arg in options(recipe["mine"])]
        if any(str(first_round) in arg for arg in mine) and not first_round.is_dir():
            sys.exit(f"{first_round} is missing: run the recipe (seed 1) of this stage first")
        spladectl("data", "mine", "--data", str(data), "--split", "train", "--out", str(mined), "--no-progress",
                  *mine, log=log)
    train_file = mined
    if "score" in recipe:
        train_file = work / "scored.jsonl"
        if not train_file.is_file():
            spladectl("data", "score", "--data", str(mined), "--corpus", str(data), "--out", str(train_file),
                      "--no-progress", *options(recipe["score"]), log=log)
    run = work / f"seed{seed}"
    started = time.perf_counter()
    if not (run / "final").is_dir():
        spladectl("train", "--data", str(train_file), "--output-dir", str(run), "--seed", str(seed), "--no-progress",
                  *options(recipe["train"]), log=log)
    minutes = (time.perf_counter() - started) / 60
    result_file = run / f"eval-{eval_split}.json"
    if not result_file.is_file():
        rows = json.loads(spladectl("eval", "--model", str(run / "final"), "--data", str(data), "--split",
                                    eval_split, "--json", "--no-progress", log=log))
        result_file.write_text(json.dumps({**rows[0], "train_minutes": round(minutes, 1)}))
    return json.loads(result_file.read_text())


def reference_rows(data: Path, split: str, recipe: dict, work: Path, log: Path) -> list[dict]:
    """Zero-shot splade-tiny and both BM25 rows, from one `spladectl eval --baseline` call."""
    cached = work / f"reference-{split}.json"
    work.mkdir(parents=True, exist_ok=True)
    if not cached.is_file():
        lengths = ["--max-doc-length", str(recipe["train"].get("max-doc-length", 256))]
        cached.write_text(spladectl("eval", "--model", recipe["train"].get("model", "splade-tiny"), "--data",
                                    str(data), "--split", split, "--baseline", "bm25:nostem,bm25:stem", "--json",
                                    "--no-progress", *lengths, log=log))
    return json.loads(cached.read_text())


def summarise(name: str, results: list[dict]) -> dict:
    row = {"name": name, "seeds": len(results)}
    for key in ("nDCG@10", "MRR@10", "R@100", "avg_query_dims", "avg_doc_dims", "avg_flops", "train_minutes"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            row[key] = statistics.mean(values)
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| run | seeds | nDCG@10 | MRR@10 | R@100 | query dims | doc dims | FLOPS | training minutes |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key, digits=4):
        if row.get(key) is None:
            return "–"
        spread = row.get(key + "_sd")
        return f"{row[key]:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread else "")

    for r in rows:
        lines.append(f"| {r['name']} | {r.get('seeds', '–')} | {cell(r, 'nDCG@10')} | {cell(r, 'MRR@10')} | "
                     f"{cell(r, 'R@100')} | {cell(r, 'avg_query_dims', 1)} | {cell(r, 'avg_doc_dims', 1)} | "
                     f"{cell(r, 'avg_flops', 2)} | {cell(r, 'train_minutes', 1)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["dev", "test"])
    parser.add_argument("--data", type=Path, required=True, help="BEIR directory with train (and test) qrels")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS))
    parser.add_argument("--no-recipe", action="store_true", help="run only the ablations")
    parser.add_argument("--work-dir", dest="work", type=Path, default=DEFAULT_WORK)
    args = parser.parse_args()
    name = args.data.resolve().name
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    data, split = (carve_dev(args.data, work, f"{name}-dev"), "dev") if args.stage == "dev" else (args.data, "test")
    base = load_recipe(args.recipe)
    variants = ([] if args.no_recipe else [("recipe", base)]) + [
        (ablation, _ablated(base, ABLATIONS[ablation])) for ablation in args.ablations]
    rows = []
    for i, row in enumerate(reference_rows(data, split, base, work / args.stage, log)):
        rows.append({**row, "name": f"{row['name']} zero-shot" if i == 0 else row["name"]})
    with open(work / "results.jsonl", "a") as out:
        for variant, recipe in variants:
            results = []
            for seed in args.seeds:
                result = run_recipe(recipe, data, split, seed, work / args.stage / variant, log)
                results.append(result)
                out.write(json.dumps({"stage": args.stage, "variant": variant, "seed": seed, **result}) + "\n")
                print(f"{variant} seed {seed}: {split} nDCG@10 {result['nDCG@10']:.4f}", flush=True)
            rows.append(summarise(variant, results))
    table = markdown(rows)
    (work / f"table-{args.stage}.md").write_text(table + "\n")
    print(table)


def _ablated(recipe: dict, change) -> dict:
    copy = json.loads(json.dumps(recipe))
    change(copy)
    return copy


if __name__ == "__main__":
    main()
