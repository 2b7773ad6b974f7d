"""Train-step time against Hugging Face PEFT LoRA on the same model.

The baseline is what a torch user would pick: `transformers` +
`peft` LoRA, eager torch, `torch.optim.AdamW`. Every row trains the SAME
weights (one Hugging Face folder, read by `transformers` and by
`keras_hub.models.Llama3Backbone.from_preset`) on the SAME token batches
(batch 4 x 128 by default), rank 8 on q, k, v, up, down, alpha = rank,
no dropout, AdamW(2e-4), one thread, sparse cross-entropy from logits
over every position:

* `peft_lora`: `peft.get_peft_model(LoraConfig(r=8, ...))`, a plain torch
  loop (forward, `F.cross_entropy`, backward, `AdamW.step`, `zero_grad`).
* torch backend, in this process: `keras_lora` (Keras's
  `layer.enable_lora(8)` on the same layers), `lora` and `relora_multi`
  (4 experts) of `keras_relora.VARIANTS`, and `relora_multi+reducer`
  (`ReducerCallback(update_layers=L // 4, interval=10)`), trained by
  `model.fit` (Keras's default `jit_compile="auto"`: eager on torch).
* `jax:relora_multi`, `tensorflow:relora_multi` (and `:lora`): the same
  configuration in a child process per backend (Keras picks its backend
  once per process). Each child is held warm and runs one round when the
  parent asks (a line on its stdin); the parent waits meanwhile, so the
  two never share the cores.

Timing: every round times each row once, in a rotated order, children
included, so a slow spell of the shared machine hits every row. A Keras
row's round is one `fit` of `steps + 1` batches stamped at every batch end
(the first step is dropped); the PEFT round is `steps` timed steps after
one untimed one. Reported: the median over rounds of the per-round ratio
to `peft_lora` in the same round, with its range. For the Reducer row,
the steps where a probe ran are left out of the steady ratio and the
probe's cost is amortised over `interval` steps separately.

Memory: for each row, the growth of the process's peak resident set
(Linux `VmHWM`, reset through `/proc/self/clear_refs`) during one round
after warm-up, above the resident set before it: activations, gradients
and temporaries of a training step, not the weights or optimizer state
already allocated. torch on CPU has no allocator statistics; RSS is what
every backend shares.

Where the time goes (`--base`, `--profile`):

* `peft_base` and `torch:base`: the same models with no adapter and only
  the first block's input norm trainable (a train step whose backward runs
  through every block, as LoRA's does, with no adapter work). The
  adapter's own overhead is `(adapted - base) / base`, per round, for PEFT
  (`peft_lora` vs `peft_base`) and for ours (`torch:lora`,
  `torch:relora_multi` vs `torch:base`); `torch:base` vs `peft_base` is
  keras-hub's layers plus Keras's train step against transformers' plain
  loop.
* `--profile`: one step of each torch row under `torch.profiler`, the self
  CPU time of its operators summed by where they were called from (the
  innermost frame in keras_relora, keras-hub, Keras's trainer, optimizer,
  loss or metrics, transformers, PEFT, torch.optim; backward operators run
  in autograd's engine and have no Python frame).

`--random-weights` builds both sides from SmolLM2-135M's config with
random weights (no GGUF needed); on a machine with CUDA, the torch rows
and PEFT run on the GPU.

Usage:

```
python benchmarks/vs_peft.py                       # SmolLM2-135M
python benchmarks/vs_peft.py --quick               # tiny random Llama
python benchmarks/vs_peft.py --backends jax --rounds 3
python benchmarks/vs_peft.py --rows lora,relora_multi --base --profile
python benchmarks/vs_peft.py --random-weights      # no GGUF, GPU if any
```
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))
RANK = 8
LR = 2e-4
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
QUICK_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "tie_word_embeddings": True,
}
# SmolLM2-135M-Instruct's architecture (its config.json), for
# `--random-weights`.
SMOLLM2_CONFIG = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
}
TORCH_ROWS = ("keras_lora", "lora", "relora_multi", "relora_multi+reducer")
CHILD_ROWS = ("relora_multi",)
TARGETS = {
    "torch:relora_multi": 1.0,
    "jax:relora_multi": 0.8,
    "tensorflow:relora_multi": 1.0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny random Llama, 2 rounds (CI smoke run)",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="default 4 (quick: 2)"
    )
    p.add_argument(
        "--seq", type=int, default=None, help="default 128 (quick: 16)"
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="default 5 (quick: 2)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per round, default 2",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--rows", default=",".join(TORCH_ROWS), help="torch-backend rows to run"
    )
    p.add_argument(
        "--backends",
        default="jax,tensorflow",
        help="other backends, each in a child process (empty: none)",
    )
    p.add_argument("--child-rows", default=",".join(CHILD_ROWS))
    p.add_argument(
        "--forward",
        action="store_true",
        help="also time the base model's forward pass alone "
        "(no grad, no adapters) in transformers and in keras-hub "
        "on torch: where a gap to PEFT comes from",
    )
    p.add_argument(
        "--jit-compile",
        action="store_true",
        help="compile the torch rows with jit_compile=True",
    )
    p.add_argument(
        "--base",
        action="store_true",
        help="also time peft_base and torch:base (no adapter, first input "
        "norm trainable): the adapter's own overhead",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one step of each torch row (torch.profiler), self CPU "
        "time by caller: keras_relora, keras-hub, Keras, transformers, ...",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="SmolLM2-135M's config with random weights (no GGUF needed)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.fill_preset(
        args,
        {"batch": 4, "seq": 128, "rounds": 5, "steps": 2},
        {"batch": 2, "seq": 16, "rounds": 2, "steps": 2},
    )
    return args


# -- model folder -------------------------------------------------------------


def model_folder(args):
    """The Hugging Face folder both sides load (SmolLM2, or a tiny Llama)."""
    if not args.quick and not args.random_weights:
        import relora_offline

        return relora_offline.convert_smollm2()
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **(QUICK_CONFIG if args.quick else SMOLLM2_CONFIG)
    )
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config)
    folder = tempfile.mkdtemp(prefix="vs_peft_tiny_")
    model.save_pretrained(folder)
    return folder


def make_tokens(args, vocab, steps):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(1, vocab, (steps, args.batch, args.seq + 1)).astype(
        "int64"
    )


# -- memory -------------------------------------------------------------------


def measure_peak(fn):
    """Runs `fn()`; returns (its result, peak RSS growth in MiB)."""
    try:
        common.reset_peak()
    except OSError:
        return fn(), None
    before = common.status_kib("VmRSS")
    result = fn()
    return result, (common.status_kib("VmHWM") - before) / 1024


# -- PEFT ---------------------------------------------------------------------


def load_backbone(folder):
    """keras-hub's Llama 3 backbone of a Hugging Face folder, with the
    folder's RMS-norm epsilon (keras-hub's converter keeps its own 1e-6
    default; SmolLM2 uses 1e-5: without this, logits differ from
    transformers' by ~6e-3 relative)."""
    import json
    import os

    import keras_hub

    with open(os.path.join(folder, "config.json")) as f:
        epsilon = float(json.load(f).get("rms_norm_eps", 1e-6))
    return keras_hub.models.Llama3Backbone.from_preset(
        folder, layer_norm_epsilon=epsilon
    )


def torch_device():
    """`"cuda"` when torch sees a GPU (Keras's torch backend uses it then)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class PeftRow:
    """PEFT LoRA; with `base=True`, no adapter and only the first block's
    input norm trainable (the backward still runs through every block)."""

    def __init__(self, folder, tokens, base=False):
        import peft
        import torch
        import transformers

        self.name = "peft_base" if base else "peft_lora"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32
        ).to(torch_device())
        if base:
            for p in model.parameters():
                p.requires_grad_(False)
            model.model.layers[0].input_layernorm.weight.requires_grad_(True)
            self.model = model
            self.note = "no adapter; layers[0].input_layernorm trainable"
        else:
            config = peft.LoraConfig(
                r=RANK,
                lora_alpha=RANK,
                lora_dropout=0.0,
                target_modules=HF_TARGETS,
            )
            self.model = peft.get_peft_model(model, config)
            self.note = (
                f"peft LoraConfig(r={RANK}, lora_alpha={RANK}, "
                f"targets={HF_TARGETS}), torch.optim.AdamW"
            )
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=LR
        )
        self.trainable = sum(
            p.numel() for p in self.model.parameters() if p.requires_grad
        )
        self.tokens = torch.from_numpy(tokens).to(torch_device())
        self.i = 0

    def logits(self, x):
        import torch

        x = torch.from_numpy(x).to(torch_device())
        with torch.no_grad():
            return self.model(input_ids=x).logits.cpu().numpy()

    def step(self):
        import torch.nn.functional as F

        batch = self.tokens[self.i % len(self.tokens)]
        self.i += 1
        logits = self.model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())

    def round(self, steps):
        self.step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return {"normal": times, "probing": []}


# -- Keras rows (any backend) ------------------------------------------------


class KerasRow:
    def __init__(self, name, folder, tokens, jit_compile="auto"):
        import keras
        import keras_hub
        import step_time

        import keras_relora

        self.name = name
        keras.utils.set_random_seed(0)
        backbone = load_backbone(folder)
        model = keras_hub.models.Llama3CausalLM(
            backbone=backbone, preprocessor=None
        )
        variant = name.split("+")[0]
        if variant == "keras_lora":
            self.note = step_time.setup_keras_lora(model, RANK)
        elif variant == "base":
            step_time.freeze_all(model)
            norm = backbone.transformer_layers[0]._self_attention_layernorm
            for variable in norm.weights:
                variable.trainable = True
            self.note = "no adapter; block 0's input norm trainable"
        else:
            self.note = step_time.setup_variant(variant)(model, RANK)
        self.callbacks = []
        if name.endswith("+reducer"):
            self.callbacks = step_time.reducer_callbacks(model)
            self.note += (
                f" + ReducerCallback(update_layers="
                f"{self.callbacks[0].update_layers}, interval="
                f"{self.callbacks[0].interval})"
            )
            self.interval = self.callbacks[0].interval
        if keras.config.backend() == "torch" and torch_device() == "cuda":
            self.callbacks.append(CudaSync())
        model.compile(
            optimizer=keras.optimizers.AdamW(LR),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
            jit_compile=jit_compile,
        )
        self.model = model
        self.args_batch = tokens.shape[1]
        self.trainable = int(
            sum(int(keras.ops.size(v)) for v in model.trainable_weights)
        )
        self.tokens = tokens
        self.keras_relora = keras_relora

    def data(self, steps):
        tokens = self.tokens[[i % len(self.tokens) for i in range(steps)]]
        tokens = tokens.reshape(-1, tokens.shape[-1]).astype("int32")
        x = {
            "token_ids": tokens[:, :-1],
            "padding_mask": (tokens[:, :-1] * 0 + 1).astype("int32"),
        }
        return {steps: (x, tokens[:, 1:])}

    def logits(self, x):
        import keras

        return keras.ops.convert_to_numpy(
            self.model.predict_on_batch(
                {
                    "token_ids": x.astype("int32"),
                    "padding_mask": (x * 0 + 1).astype("int32"),
                }
            )
        )

    def round(self, steps):
        import step_time

        normal, probing = step_time.run_fit(
            self, self.data(steps + 1), steps + 1
        )
        return {"normal": normal, "probing": probing}

    def warm_up(self, steps):
        # With the Reducer: `interval` steps, so that the first probe (which
        # traces the test step) falls in the warm-up.
        count = getattr(self, "interval", steps + 1)
        return self.round(max(count, steps + 1) - 1)


def CudaSync():
    """A callback that waits for the GPU at every batch end (before the
    step timer stamps it)."""
    import keras
    import torch

    class Sync(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            torch.cuda.synchronize()

    return Sync()


class ForwardRow:
    """The base model's forward pass alone, no grad (`--forward`)."""

    def __init__(self, name, model_logits, tokens):
        self.name = name
        self.model_logits = model_logits
        self.x = tokens[0][:, :-1]
        self.note = "forward only, no grad, no adapters"
        self.trainable = 0

    def round(self, steps):
        self.model_logits(self.x)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.model_logits(self.x)
            times.append(time.perf_counter() - start)
        return {"normal": times, "probing": []}


def forward_rows(folder, tokens):
    import keras_hub
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).to(torch_device())
    hf.eval()

    def hf_logits(x):
        with torch.no_grad():
            return hf(input_ids=torch.from_numpy(x).to(torch_device())).logits

    backbone = load_backbone(folder)
    lm = keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)

    def keras_logits(x):
        with torch.no_grad():
            return lm(
                {
                    "token_ids": x.astype("int32"),
                    "padding_mask": (x * 0 + 1).astype("int32"),
                }
            )

    return {
        "hf_forward": ForwardRow("hf_forward", hf_logits, tokens),
        "keras_forward": ForwardRow("keras_forward", keras_logits, tokens),
    }


def timed_round(row, steps):
    out, peak = measure_peak(lambda: row.round(steps))
    out["peak_mib"] = peak
    return out


# -- child process (another backend) -----------------------------------------


def child_main(args):
    common.pin_threads_env(args.threads)
    import keras  # noqa: F401

    common.pin_threads_runtime(args.threads)
    sys.path.insert(0, HERE)
    env = common.environment(args.threads)
    folder = args.folder
    import transformers

    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    tokens = make_tokens(args, vocab, args.steps + 1)
    import numpy as np

    folder_tmp = tempfile.mkdtemp(prefix=f"vs_peft_{env['backend']}_")
    rows, logits = {}, {}
    for name in args.child_rows.split(","):
        start = time.perf_counter()
        rows[name] = KerasRow(name, folder, tokens)
        # Full logits are large (batch x seq x vocab): passed as a file.
        logits[name] = os.path.join(folder_tmp, f"{name}.npy")
        np.save(logits[name], rows[name].logits(tokens[0][:, :-1]))
        rows[name].warm_up(args.steps)
        print(
            f"[{env['backend']}] built and warmed {name} "
            f"({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    reply(
        {
            "ready": True,
            "env": env,
            "rows": {
                name: {"note": row.note, "trainable": row.trainable}
                for name, row in rows.items()
            },
            "logits": logits,
        }
    )
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        reply(timed_round(rows[command[1]], args.steps))


def reply(obj):
    sys.stdout.write(common.RESULT_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


class ChildRow:
    """A row run by a warm child process of another backend."""

    def __init__(self, backend, name, process):
        self.backend = backend
        self.name = f"{backend}:{name}"
        self.row = name
        self.process = process

    def round(self, steps):
        self.process.send(f"round {self.row}")
        return self.process.receive()


class Child:
    def __init__(self, backend, args, folder):
        argv = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            "--folder",
            folder,
            "--child-rows",
            args.child_rows,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        if args.quick:
            argv.append("--quick")
        env = dict(os.environ, KERAS_BACKEND=backend)
        self.backend = backend
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self):
        for line in self.proc.stdout:
            if line.startswith(common.RESULT_TAG):
                return json.loads(line[len(common.RESULT_TAG) :])
            print(f"[{self.backend}] {line}", end="")
        raise RuntimeError(
            f"the {self.backend} child exited with code {self.proc.wait()}"
        )

    def close(self):
        try:
            self.send("quit")
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=60)


# -- parent -------------------------------------------------------------------


def main(args):
    if args.child:
        child_main(args)
        return
    os.environ["KERAS_BACKEND"] = "torch"
    common.pin_threads_env(args.threads)
    import keras
    import numpy as np
    import transformers

    common.pin_threads_runtime(args.threads)
    sys.path.insert(0, HERE)
    env = common.environment(args.threads)
    print(f"environment: {env}", flush=True)
    folder = model_folder(args)
    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    tokens = make_tokens(args, vocab, args.steps + 1)
    backends = [b for b in args.backends.split(",") if b]
    # Children start first: they build and compile while the parent does.
    # Their build competes with the parent's for the cores; no timing runs
    # until every row is warm.
    children = [Child(b, args, folder) for b in backends]
    rows = {}
    try:
        start = time.perf_counter()
        # Logits of every row before any training step: the same weights.
        check = tokens[0][:, :-1]
        rows["peft_lora"] = PeftRow(folder, tokens)
        reference = rows["peft_lora"].logits(check)
        same = {}
        rows["peft_lora"].round(1)
        print(
            f"built peft_lora ({time.perf_counter() - start:.1f} s)", flush=True
        )
        torch_rows = [r for r in args.rows.split(",") if r]
        if args.base:
            rows["peft_base"] = PeftRow(folder, tokens, base=True)
            rows["peft_base"].round(1)
            torch_rows.append("base")
        jit = True if args.jit_compile else "auto"
        for name in torch_rows:
            start = time.perf_counter()
            rows[name] = KerasRow(name, folder, tokens, jit)
            same[name] = rel_diff(rows[name].logits(check), reference)
            rows[name].warm_up(args.steps)
            print(
                f"built and warmed {name} "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        if args.forward:
            rows.update(forward_rows(folder, tokens))
        notes = {
            n: {"note": r.note, "trainable": r.trainable}
            for n, r in rows.items()
        }
        for child in children:
            ready = child.receive()
            env[f"{child.backend}_env"] = ready["env"]
            for name, info in ready["rows"].items():
                row = ChildRow(child.backend, name, child)
                rows[row.name] = row
                notes[row.name] = info
                same[row.name] = rel_diff(
                    np.load(ready["logits"][name]), reference
                )
        print(
            f"logits before training vs PEFT, max |diff| / max |ref|: {same}",
            flush=True,
        )
        samples = interleave(rows, args)
        profiles = {}
        if args.profile:
            for name, row in rows.items():
                if isinstance(row, (PeftRow, KerasRow)):
                    profiles[name] = profile_step(row)
    finally:
        for child in children:
            child.close()
    env["loadavg_end"] = round(os.getloadavg()[0], 2)
    report(args, env, samples, notes, same, profiles)
    del keras


# Where an operator was called from: the innermost frame of its Python
# stack whose file matches (backward operators have no Python frame).
CALLERS = (
    ("keras_relora/", "keras_relora (ours)"),
    ("keras/src/backend/torch/optimizers/", "Keras optimizer"),
    ("keras/src/optimizers/", "Keras optimizer"),
    ("keras/src/losses/", "Keras loss"),
    ("keras/src/metrics/", "Keras metrics"),
    ("keras/src/backend/torch/trainer", "Keras train step"),
    ("keras/src/trainers/", "Keras train step"),
    ("keras_hub/", "keras-hub layers"),
    ("peft/", "PEFT"),
    ("transformers/", "transformers layers"),
    ("torch/optim/", "torch.optim"),
    ("vs_peft.py", "plain loop (loss)"),
)


def profile_step(row):
    """Self CPU ms of one train step, by caller (`CALLERS`): of its torch
    operators, and of the Python functions that the profiler's Python
    tracer records (which slows Python-heavy code, so the step's profiled
    wall time is longer than its timed one)."""
    import torch

    if isinstance(row, KerasRow):
        (x, y) = row.data(1)[1]
        row.model.train_on_batch(x, y)  # Builds the function, untimed.

        def step():
            row.model.train_on_batch(x, y)
    else:
        step = row.step
    activities = [torch.profiler.ProfilerActivity.CPU]
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities, with_stack=True) as p:
        step()
    wall = time.perf_counter() - start
    by_caller = {}
    for event in p.events():
        python = ".py(" in event.name or event.name.startswith("<built-in")
        caller, parent, seen_python = None, event, False
        while parent is not None and caller is None:
            name = parent.name.replace("\\", "/")
            seen_python = seen_python or ".py(" in name
            caller = next((c for key, c in CALLERS if key in name), None)
            if name.startswith("autograd::engine"):
                caller = "backward (autograd engine)"
            parent = parent.cpu_parent
        if caller is None and "threading.py(" in name:
            continue  # Another thread's wait (e.g. tqdm's monitor).
        if caller is None:
            caller = "other" if seen_python else "backward (autograd engine)"
        key = f"{caller}, {'Python' if python else 'operators'}"
        by_caller[key] = (
            by_caller.get(key, 0.0) + event.self_cpu_time_total / 1e3
        )
    return {"wall_ms": 1e3 * wall, "self_cpu_ms": by_caller}


def rel_diff(got, reference):
    """max |got - reference| / max |reference|, as a float."""
    import numpy as np

    return float(np.max(np.abs(got - reference)) / np.max(np.abs(reference)))


def interleave(rows, args):
    """Each round times every row once, in a rotated order."""
    names = list(rows)
    samples = {name: [] for name in names}
    for r in range(args.rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if r % 2:
            order = order[::-1]
        for name in order:
            row = rows[name]
            if isinstance(row, ChildRow):
                samples[name].append(row.round(args.steps))
            else:
                samples[name].append(timed_round(row, args.steps))
        print(
            f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.2f})",
            flush=True,
        )
        if args.json:
            # The samples so far: a long run killed later (e.g. for memory
            # on a shared machine) leaves its finished rounds.
            with open(args.json + ".partial", "w") as f:
                json.dump(samples, f)
    return samples


def report_overheads(samples):
    """`(adapted - base) / base` per round, medians: PEFT's and ours."""
    pairs = [("peft_lora", "peft_base")] + [
        (name, "base")
        for name in samples
        if ":" not in name
        and not name.endswith("_forward")
        and name not in ("peft_lora", "peft_base", "base")
    ]
    pairs += [("base", "peft_base")]
    out = {}
    for adapted, base in pairs:
        if adapted not in samples or base not in samples:
            continue
        ratios = [
            statistics.median(a["normal"]) / statistics.median(b["normal"]) - 1
            for a, b in zip(samples[adapted], samples[base], strict=True)
        ]
        out[f"{adapted} vs {base}"] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
    if out:
        print("\n(adapted - base) / base, median [min, max] over rounds:")
        for name, stats in out.items():
            print(
                f"  {name:<32} {stats['median']:+.3f} "
                f"[{stats['min']:+.3f}, {stats['max']:+.3f}]"
            )
    return out


def report_profiles(profiles):
    if not profiles:
        return
    callers = sorted({c for p in profiles.values() for c in p["self_cpu_ms"]})
    rows = [
        [c] + [f"{p['self_cpu_ms'].get(c, 0):.0f}" for p in profiles.values()]
        for c in callers
    ]
    rows.append(
        ["total self CPU"]
        + [f"{sum(p['self_cpu_ms'].values()):.0f}" for p in profiles.values()]
    )
    rows.append(
        ["step wall (profiled)"]
        + [f"{p['wall_ms']:.0f}" for p in profiles.values()]
    )
    print("\nOne profiled step, self CPU ms by caller:")
    print(common.markdown_table(["caller", *profiles], rows))


def report(args, env, samples, notes, same, profiles=None):
    base = [statistics.median(s["normal"]) for s in samples["peft_lora"]]
    result = {
        "env": env,
        "args": vars(args),
        "logits_vs_peft": same,
        "rows": {},
    }
    rows = []
    for name, rounds in samples.items():
        label = (
            name
            if ":" in name
            else (
                name
                if name in ("peft_lora", "peft_base", "hf_forward")
                else f"torch:{name}"
            )
        )
        medians = [statistics.median(s["normal"]) for s in rounds]
        ratios = [a / b for a, b in zip(medians, base, strict=False)]
        stats = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
        flat = [t for s in rounds for t in s["normal"]]
        peaks = [s["peak_mib"] for s in rounds if s["peak_mib"] is not None]
        entry = {
            **notes[name],
            "time": common.time_stats(flat),
            "vs_peft": stats,
            "rounds": rounds,
            "peak_mib": statistics.median(peaks) if peaks else None,
        }
        probing = [t for s in rounds for t in s["probing"]]
        cell_ratio = common.fmt_ratio(stats)
        if name.endswith("+reducer") and probing:
            interval = 10
            steady = statistics.median(flat)
            cost = statistics.median(probing) - steady
            amortised = stats["median"] * (1 + cost / (interval * steady))
            entry["probe_cost_ms"] = 1e3 * cost
            entry["amortised_vs_peft"] = amortised
            cell_ratio += f"; with probes amortised {amortised:.3f}"
        result["rows"][label] = entry
        target = TARGETS.get(label)
        verdict = ""
        if target is not None:
            met = stats["median"] <= target
            verdict = f"<= {target} {'MET' if met else 'NOT MET'}"
        rows.append(
            [
                label,
                f"{entry['trainable']:,}",
                common.fmt_ms(entry["time"]),
                cell_ratio,
                "-"
                if entry["peak_mib"] is None
                else f"{entry['peak_mib']:.0f}",
                verdict,
            ]
        )
    if "hf_forward" in samples:
        ratios = [
            statistics.median(a["normal"]) / statistics.median(b["normal"])
            for a, b in zip(
                samples["keras_forward"], samples["hf_forward"], strict=False
            )
        ]
        result["keras_forward_vs_hf_forward"] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
        print(
            "base forward, keras-hub (torch) / transformers: "
            f"{common.fmt_ratio(result['keras_forward_vs_hf_forward'])}"
        )
    model = "tiny random Llama" if args.quick else "SmolLM2-135M"
    print(
        f"\n{model}, batch {args.batch} x {args.seq}, rank {RANK}, "
        f"rounds={args.rounds} steps/round={args.steps} "
        f"threads={args.threads} jit_compile(torch)={args.jit_compile} "
        f"loadavg {env['loadavg_start']} -> {env['loadavg_end']}"
    )
    print(
        common.markdown_table(
            [
                "row",
                "trainable",
                "ms/step median [min, max]",
                "x peft_lora median [min, max]",
                "peak RSS growth MiB",
                "target",
            ],
            rows,
        )
    )
    result["adapter_overhead"] = report_overheads(samples)
    result["profiles"] = profiles or {}
    report_profiles(profiles)
    common.emit_result(result)
    common.write_json(args.json, result)


if __name__ == "__main__":
    main(parse_args())
