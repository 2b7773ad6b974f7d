"""Zero-shot table of the real models: keras-hub vs transformers, side by side.

For each model (SmolLM2-135M-Instruct, Gemma 3 270M) and task (SST-2,
ARC-Easy, PIQA, SciQ, BoolQ by default), the same seeded documents are
scored by OLMo's evaluator (`olmo_eval.ICLMetric`, through
`relora_offline.olmo_scorer.score_task`) twice: on the keras-hub model
(`keras_logits_fn`, the process's Keras backend) and on transformers'
model of the same weights (`transformers_logits_fn`, PyTorch float32).
Printed per row: the task's accuracy metric on each side, how many
documents' predictions differ between the two, the largest difference of
a gold continuation's summed NLL, the majority-label or chance baseline,
and the wall seconds of each side.

Each finished row is appended to `--out` (JSON lines) at once, so a run
cut short keeps its rows; `--report` prints the markdown table of such a
file.

    KERAS_BACKEND=jax OMP_NUM_THREADS=2 .venv/bin/python \\
        benchmarks/zero_shot.py --docs 200 --out zero_shot.jsonl
    .venv/bin/python benchmarks/zero_shot.py --report zero_shot.jsonl
"""

import argparse
import json
import os
import time

import numpy as np

MODELS = ("smollm2", "gemma3")
TASKS = ("sst2", "arc_easy", "piqa", "sciq", "boolq")
TITLES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma 3 270M"}


def load(name):
    """`(keras_lm, transformers_model, olmo_eval tokenizer)` of a model."""
    import torch
    import transformers

    if name == "smollm2":
        from relora_offline import olmo_data
        from relora_offline import smollm2

        folder = smollm2.convert_smollm2()
        lm = smollm2.load_smollm2(dtype="float32", sequence_length=128)
        tokenizer = olmo_data.smollm2_tokenizer(folder)
    elif name == "gemma3":
        from relora_offline import gemma3

        folder = gemma3.convert_gemma3()
        lm = gemma3.load_gemma3(dtype="float32", sequence_length=128)
        tokenizer = gemma3.gemma3_tokenizer(folder)
    else:
        raise ValueError(
            f"`--models` takes names from {list(MODELS)}. Received: {name!r}"
        )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).eval()
    return lm, hf, tokenizer


def run(models, tasks, docs, seed, batch_size, out):
    import keras
    import torch

    from relora_offline import olmo_data
    from relora_offline import olmo_scorer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    backend = keras.config.backend()
    rows = []
    for model in models:
        start = time.perf_counter()
        lm, hf, tokenizer = load(model)
        print(f"{model}: loaded in {time.perf_counter() - start:.0f} s")
        sides = (
            (f"keras-hub ({backend})", olmo_scorer.keras_logits_fn(lm)),
            ("transformers (torch)", olmo_scorer.transformers_logits_fn(hf)),
        )
        for task_name in tasks:
            task = olmo_data.build_task(task_name, tokenizer)
            train_ids, doc_ids = olmo_data.split_documents(
                task, 200, docs, seed=seed
            )
            baseline, kind = olmo_data.majority_baseline(
                task, train_ids, doc_ids
            )
            scores, seconds = [], []
            for _, fn in sides:
                start = time.perf_counter()
                scores.append(
                    olmo_scorer.score_task(
                        fn, task, doc_ids, batch_size=batch_size
                    )
                )
                seconds.append(time.perf_counter() - start)
            key = olmo_scorer.accuracy_key(task)
            row = {
                "model": model,
                "task": task_name,
                "docs": len(doc_ids),
                "seed": seed,
                "metric": key,
                "names": [name for name, _ in sides],
                "accuracy": [s.metrics[key] for s in scores],
                "seconds": seconds,
                "differ": int(
                    np.sum(scores[0].predictions != scores[1].predictions)
                ),
                "max_gold_nll_diff": float(
                    np.max(np.abs(scores[0].gold_nll - scores[1].gold_nll))
                ),
                "baseline": baseline,
                "baseline_kind": kind,
                "load": os.getloadavg(),
            }
            rows.append(row)
            print(_line(row), flush=True)
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        del lm, hf
    return rows


def _line(row):
    a, b = row["accuracy"]
    ka, kb = row["seconds"]
    return (
        f"{row['model']:<8} {row['task']:<9} {row['docs']:>4} "
        f"{row['metric']:<12} {a:7.2%} ({ka:4.0f} s) {b:7.2%} ({kb:4.0f} s) "
        f"differ {row['differ']:>3}  max|d nll| {row['max_gold_nll_diff']:.1e}"
        f"  {row['baseline_kind']} {row['baseline']:.1%}"
    )


def report(rows):
    """The markdown table of rows (one per model and task)."""
    names = rows[0]["names"]
    lines = [
        f"| model | task | docs | metric | {names[0]} | {names[1]} | "
        "predictions that differ | max abs diff of a gold summed NLL | "
        "majority or chance | seconds (keras-hub / transformers) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        a, b = row["accuracy"]
        ka, kb = row["seconds"]
        lines.append(
            f"| {TITLES.get(row['model'], row['model'])} | {row['task']} | "
            f"{row['docs']} | {row['metric']} | {100 * a:.1f} | "
            f"{100 * b:.1f} | {row['differ']} | "
            f"{row['max_gold_nll_diff']:.1e} | {row['baseline_kind']} "
            f"{100 * row['baseline']:.1f} | {ka:.0f} / {kb:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="append each row here (JSON lines)")
    parser.add_argument(
        "--report", help="print the table of this JSON-lines file and exit"
    )
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = run(
            args.models.split(","),
            args.tasks.split(","),
            args.docs,
            args.seed,
            args.batch_size,
            args.out,
        )
    print(report(rows))


if __name__ == "__main__":
    main()
