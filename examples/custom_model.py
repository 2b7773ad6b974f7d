"""ReLoRA on your own Keras model: nothing here is tied to keras-hub.

A plain functional MLP is first trained, in full, to read digits (drawn
with PIL by `digit_images.py`, 16x16 grayscale). Then the digits turn on
their side (rotated 90 degrees): a new domain the base model reads badly.
ReLoRA adapts the frozen MLP to it:

1. `model.enable_relora(...)` freezes every weight and adds adapters to
   each Dense layer (each Dense layer of a functional model is a block of
   its own for the Reducer);
2. `fit` with `keras_relora.ReducerCallback`, which updates the B experts
   of `--update-layers` blocks per step;
3. `keras_relora.merge_relora(model, calibration_data=...)` folds the
   adapters into the kernels: a plain Keras model again, exact with
   `--experts 1`, with the mean gates over the calibration data (and the
   measured error printed) when experts are routed;
4. the merged model is saved as `.keras` and loaded back, and the adapters
   alone as `.safetensors`.

Accuracies are measured on held-out digits, before and after.

    python examples/custom_model.py              # ~1 min, CPU
    python examples/custom_model.py --tiny       # CI, seconds
    python examples/custom_model.py --experts 2  # routed: approximate merge
"""

import argparse
import os
import time

import digit_images
import keras
import numpy as np

import keras_relora

NAME = "custom_model"
SIZE = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="A few seconds of work (for CI)."
    )
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--base-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--experts",
        type=int,
        default=1,
        help="B experts per layer; 1 merges exactly, more "
        "are routed and merge with mean gates.",
    )
    parser.add_argument(
        "--update-layers",
        type=int,
        default=2,
        help="Blocks (here: Dense layers) whose B is updated each step.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.path.join("outputs", NAME))
    args = parser.parse_args(argv)
    if args.tiny:
        args.train_images, args.test_images = 128, 64
        args.base_epochs, args.epochs, args.batch_size = 1, 1, 32
    return args


def digits(num, seed, rotated):
    """Flattened 16x16 ink images in [0, 1] and their digit labels."""
    images, labels, _ = digit_images.render_digits(num, SIZE, seed=seed)
    ink = 1.0 - images.mean(axis=-1) / 255.0  # (num, 16, 16)
    if rotated:
        ink = np.rot90(ink, k=1, axes=(1, 2))
    return ink.reshape(num, -1).astype("float32"), labels


def base_model():
    inputs = keras.Input((SIZE * SIZE,), name="pixels")
    x = keras.layers.Dense(256, activation="relu", name="hidden_1")(inputs)
    x = keras.layers.Dense(128, activation="relu", name="hidden_2")(x)
    x = keras.layers.Dense(128, activation="relu", name="hidden_3")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digit_mlp")


def compile_for_accuracy(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float((np.argmax(logits, axis=-1) == y).mean())


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"Backend: {keras.config.backend()}")
    keras.utils.set_random_seed(args.seed)
    verbose = 0 if args.tiny else 2

    n, m = args.train_images, args.test_images
    upright_x, upright_y = digits(n + m, args.seed, rotated=False)
    rotated_x, rotated_y = digits(n + m, args.seed + 1, rotated=True)
    print(
        f"Data: {n} training and {m} test images per domain, upright "
        f"and rotated digits ({SIZE}x{SIZE}) "
        f"({time.time() - start:.1f}s)"
    )

    # --- 1. A base model, trained in full on upright digits ---------------
    model = base_model()
    compile_for_accuracy(model, 1e-3)
    model.fit(
        upright_x[:n],
        upright_y[:n],
        batch_size=args.batch_size,
        epochs=args.base_epochs,
        verbose=verbose,
    )
    base_upright = accuracy(model, upright_x[n:], upright_y[n:])
    base_rotated = accuracy(model, rotated_x[n:], rotated_y[n:])

    # --- 2. ReLoRA on rotated digits ---------------------------------------
    report = model.enable_relora(rank=args.rank, experts=args.experts)
    print(report)
    compile_for_accuracy(model, args.learning_rate)
    reducer = keras_relora.ReducerCallback(
        update_layers=args.update_layers, interval=10, seed=args.seed
    )
    fit_start = time.time()
    model.fit(
        rotated_x[:n],
        rotated_y[:n],
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=[reducer],
        verbose=verbose,
    )
    fit_time = time.time() - fit_start
    tuned_rotated = accuracy(model, rotated_x[n:], rotated_y[n:])
    tuned_upright = accuracy(model, upright_x[n:], upright_y[n:])

    # --- 3. Merge, save, load -----------------------------------------------
    merged = keras_relora.merge_relora(
        model, calibration_data=rotated_x[:n], batch_size=256
    )
    merged_rotated = accuracy(merged, rotated_x[n:], rotated_y[n:])
    merged_path = os.path.join(args.output_dir, "merged.keras")
    merged.save(merged_path)
    loaded = keras.models.load_model(merged_path)
    same = np.array_equal(
        loaded.predict(rotated_x[n:], verbose=0),
        merged.predict(rotated_x[n:], verbose=0),
    )
    adapters_path = os.path.join(args.output_dir, "adapters.safetensors")
    keras_relora.save_relora_weights(model, adapters_path)

    print(f"Test accuracy ({m} held-out images each):")
    print(f"  base model, upright digits:    {base_upright:.1%}")
    print(f"  base model, rotated digits:    {base_rotated:.1%}")
    print(
        f"  after ReLoRA, rotated digits:  {tuned_rotated:.1%}  "
        f"({args.epochs} epochs, {fit_time:.1f}s)"
    )
    print(f"  after ReLoRA, upright digits:  {tuned_upright:.1%}")
    print(f"  merged model, rotated digits:  {merged_rotated:.1%}")
    print(
        f"Merged model is a plain {type(merged).__name__} with "
        f"{len(merged.weights)} weights (the adapted model has "
        f"{len(model.weights)}); reloaded from .keras: "
        f"{'identical' if same else 'DIFFERENT'} predictions."
    )
    print(
        f"Block importance (Reducer, one block per Dense layer): "
        f"{np.round(reducer.importance.astype(float), 4).tolist()}"
    )
    print(f"Outputs in {args.output_dir}/:")
    print("  merged.keras          the merged plain Keras model")
    print("  adapters.safetensors  the adapters only")
    print(f"Done in {time.time() - start:.1f}s.")
    return {
        "base_upright": base_upright,
        "base_rotated": base_rotated,
        "tuned_rotated": tuned_rotated,
        "tuned_upright": tuned_upright,
        "merged_rotated": merged_rotated,
        "reloaded_identical": bool(same),
        "paths": {"merged": merged_path, "adapters": adapters_path},
    }


if __name__ == "__main__":
    main()
