"""What the main job saves by computing only what its loss and scorer read.

Two comparisons on the main job's model and data, in one process, in
interleaved rounds (`common.interleave`), on this process's backend:

* a train step (8 x 48 tokens, the Reducer-free AdamW step) of the
  `CausalLM` itself, with logits, loss and metrics at all 384 positions as
  the main job trained before, against `position_logits_model`, with the
  vocabulary projection and the loss at the answer tokens only
  (`weighted_positions`), as the main job trains now;
* scoring the held-out documents with the OLMo scorer, padded to few
  shapes (`fixed_shapes=True`, what JAX and TensorFlow need) against not
  padded (`fixed_shapes=False`, the default on torch eager).

Commands:

    KERAS_BACKEND=torch .venv/bin/python benchmarks/answer_positions.py \\
        --json benchmarks/results/answer_positions_torch.json
    KERAS_BACKEND=torch .venv/bin/python benchmarks/answer_positions.py --quick
"""

import argparse
import statistics
import tempfile
import time

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="train steps per round")
    p.add_argument(
        "--score-rounds", type=int, default=2, help="scoring passes per way"
    )
    p.add_argument(
        "--score-docs",
        type=int,
        default=100,
        help="held-out documents scored per task (of the main job's 200)",
    )
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _full_arrays(x, y, weight, length):
    """The per-position arrays the `CausalLM` trains on, from the answer
    positions (the inverse of `weighted_positions`)."""
    import numpy as np

    full_y = np.zeros((len(y), length), y.dtype)
    full_w = np.zeros((len(y), length), weight.dtype)
    rows = np.arange(len(y))[:, None]
    full_y[rows, x["positions"]] = y
    full_w[rows, x["positions"]] = weight  # Padding slots: weight 0 at 0.
    return full_y, full_w


def main(args):
    import keras
    import numpy as np

    import keras_relora
    from relora_offline import causal_lm_logits
    from relora_offline import main_job
    from relora_offline import main_job_data
    from relora_offline import olmo_scorer

    out = tempfile.mkdtemp(prefix="answer_positions_")
    job_args = main_job.parse_args(
        ["--output-dir", out] + (["--tiny"] if args.quick else [])
    )
    lm, model_name = main_job.load_causal_lm(job_args)
    preprocessor = lm.preprocessor
    data = main_job_data.build(job_args, preprocessor.tokenizer, preprocessor)
    keras_relora.enable_relora(lm, rank=job_args.rank, experts=job_args.experts)
    lm.preprocessor = None
    lm.compile(
        optimizer=keras.optimizers.AdamW(job_args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="answer_token_acc"),
            keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="answer_nll"
            ),
        ],
        jit_compile=job_args.jit_compile,
    )
    trainer = causal_lm_logits.position_logits_model(lm)
    trainer.compile(
        optimizer=keras.optimizers.AdamW(job_args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="answer_token_acc")
        ],
        jit_compile=job_args.jit_compile,
    )
    size = job_args.batch_size
    batches = []
    for step in range(data.steps):
        rows = slice(step * size, (step + 1) * size)
        x = {k: v[rows] for k, v in data.x.items()}
        y, w = data.y[rows], data.sample_weight[rows]
        full_y, full_w = _full_arrays(x, y, w, job_args.sequence_length)
        tokens = {k: x[k] for k in ("token_ids", "padding_mask")}
        batches.append(((tokens, full_y, full_w), (x, y, w)))
    calls = {"all positions": 0, "answer positions": 0}

    def step(name, model, which):
        def run():
            batch = batches[calls[name] % len(batches)][which]
            calls[name] += 1
            model.train_on_batch(batch[0], batch[1], sample_weight=batch[2])

        return run

    runners = {
        "all positions": step("all positions", lm, 0),
        "answer positions": step("answer positions", trainer, 1),
    }
    for run in runners.values():  # Compile (JAX, TensorFlow) and warm up.
        run()
    steps = common.interleave(runners, args.rounds, args.reps)

    evaluation = data.evaluation
    splits = {
        name: test[: args.score_docs]
        for name, (_, test) in evaluation.splits.items()
    }
    logits_fns = {}
    for fixed in (True, False):
        logits_fns[fixed] = olmo_scorer.keras_logits_fn(lm)
        logits_fns[fixed].fixed_shapes = fixed
    scores, score_seconds = {}, {True: [], False: []}
    for r in range(args.score_rounds):
        for fixed in (True, False) if r % 2 == 0 else (False, True):
            start = time.perf_counter()
            scores[fixed] = {
                name: olmo_scorer.score_task(
                    logits_fns[fixed],
                    task,
                    splits[name],
                    batch_size=job_args.eval_batch_size,
                )
                for name, task in evaluation.tasks.items()
            }
            score_seconds[fixed].append(time.perf_counter() - start)
    same = all(
        np.array_equal(
            scores[True][n].predictions, scores[False][n].predictions
        )
        and np.allclose(
            scores[True][n].gold_nll, scores[False][n].gold_nll, rtol=1e-4
        )
        for n in evaluation.tasks
    )
    result = {
        "model": model_name,
        "backend": keras.config.backend(),
        "environment": common.environment(None),
        "width": int(data.y.shape[1]),
        "sequence_length": job_args.sequence_length,
        "batch_size": size,
        "train_step_s": {
            name: common.time_stats(values) for name, values in steps.items()
        },
        "train_step_ratio": common.ratio_stats(
            steps, "answer positions", "all positions"
        ),
        "scoring_s": {
            "padded": score_seconds[True],
            "not padded": score_seconds[False],
        },
        "scoring_ratio_median": statistics.median(
            a / b
            for a, b in zip(
                score_seconds[False], score_seconds[True], strict=True
            )
        ),
        "score_docs_per_task": {n: len(d) for n, d in splits.items()},
        "same_scores": bool(same),
    }
    print(
        f"{model_name}: answer positions {data.y.shape[1]} of "
        f"{job_args.sequence_length} per row"
    )
    for name, stats in result["train_step_s"].items():
        print(f"  train step, {name:<17} {common.fmt_ms(stats)} ms")
    print(
        "  answer / all positions: "
        f"{common.fmt_ratio(result['train_step_ratio'])}"
    )
    for name, values in result["scoring_s"].items():
        print(
            f"  scoring, {name:<11} " + ", ".join(f"{v:.1f} s" for v in values)
        )
    print(
        f"  not padded / padded: {result['scoring_ratio_median']:.3f}; "
        f"same predictions and gold NLL: {same}"
    )
    common.emit_result(result)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(parse_args())
