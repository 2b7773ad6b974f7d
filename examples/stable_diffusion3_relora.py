"""ReLoRA on Stable Diffusion 3's MMDiT, trained with the flow-matching loss.

The data is an offline image-caption set: digits rendered with PIL
(`digit_images.py`) and captioned like "a red digit seven". Images are
encoded to latents by the backbone's VAE encoder and captions by its two
CLIP text encoders, once, before training. Each training step then draws
a batch of latents `x0`, Gaussian noise and times `t` (logit-normal, as in
the SD3 paper) and trains the MMDiT to predict the velocity `noise - x0` at
`x_t = (1 - t) x0 + t noise` (rectified flow), with ReLoRA adapters on its
attention projections and the Reducer picking which blocks' B experts to
update. Samples before and after come from a plain Euler loop over the
MMDiT's velocity, `x += (t_next - t) * v(x, t)`, decoded by the VAE.

By default the backbone is a small random-weight SD3 built offline (no
weights ship for SD3 here): the loss and sample numbers are real
measurements of that model, but its random VAE cannot decode latents to
recognisable pictures, so the saved images show the pipeline, not a
fine-tuned artist. `--preset stable_diffusion_3_medium` runs the same code
on real weights (a download and a GPU are needed for that).

    python examples/stable_diffusion3_relora.py            # ~1-3 min, CPU
    python examples/stable_diffusion3_relora.py --tiny     # CI, seconds
    python examples/stable_diffusion3_relora.py \\
        --preset stable_diffusion_3_medium --image-size 256
"""

import argparse
import itertools
import os
import time

import digit_images
import keras
import keras_hub
import numpy as np
from keras import ops

import keras_relora

NAME = "stable_diffusion3_relora"
# Word-level vocabulary of the offline CLIP encoders. CLIP pools the text at
# the largest token id (its end token), and pads with it too.
WORDS = (
    ("<pad>", "a", "digit")
    + digit_images.COLOR_WORDS
    + digit_images.DIGIT_WORDS
    + ("<start>", "<end>")
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="A few seconds of work (for CI)."
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="A keras-hub SD3 preset, e.g. "
        "stable_diffusion_3_medium (needs a download).",
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=150, help="Training steps."
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument(
        "--update-layers",
        type=int,
        default=None,
        help="Blocks whose B is updated each step "
        "(default: a quarter of the blocks).",
    )
    parser.add_argument("--probe-interval", type=int, default=10)
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=8,
        help="Euler steps when sampling images.",
    )
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.path.join("outputs", NAME))
    args = parser.parse_args(argv)
    if args.tiny:
        args.image_size, args.train_images, args.eval_images = 16, 16, 8
        args.steps, args.batch_size = 4, 4
        args.probe_interval, args.sample_steps, args.samples = 2, 2, 4
    return args


# Two offline configs, both with a 4-level VAE (8x downsampling, as SD3's:
# the MMDiT's latent input is a fixed eighth of the image size). "small"
# (the default) has 4 MMDiT blocks; "tiny" (`--tiny`, for CI) has the
# MMDiT and CLIP shapes of the test suite's tiny SD3
# (tests/helpers/tiny_models.py), so that a test run compiles fewer new
# shapes.
CONFIGS = {
    "small": {
        "mmdit_dim": 64,
        "mmdit_layers": 4,
        "patch": 1,
        "clip_dim": 16,
        "clip_vocab": len(WORDS),
        "text_length": 8,
    },
    "tiny": {
        "mmdit_dim": 16,
        "mmdit_layers": 2,
        "patch": 2,
        "clip_dim": 8,
        "clip_vocab": 64,
        "text_length": 77,
    },
}


def offline_backbone(image_size, seed, config):
    """A random-weight SD3 of one of `CONFIGS`, built offline."""
    # VAEBackbone is not exported in keras_hub.models.
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    c = CONFIGS[config]
    keras.utils.set_random_seed(seed)
    vae = VAEBackbone(
        encoder_num_filters=[32] * 4,
        encoder_num_blocks=[1] * 4,
        decoder_num_filters=[32] * 4,
        decoder_num_blocks=[1] * 4,
        sampler_method="mode",
        input_channels=3,
        sample_channels=8,
        output_channels=3,
    )

    def clip(name):
        return keras_hub.models.CLIPTextEncoder(
            vocabulary_size=c["clip_vocab"],
            embedding_dim=c["clip_dim"],
            hidden_dim=c["clip_dim"],
            num_layers=2,
            num_heads=2,
            intermediate_dim=2 * c["clip_dim"],
            intermediate_activation="quick_gelu",
            intermediate_output_index=0,
            max_sequence_length=c["text_length"],
            name=name,
        )

    return keras_hub.models.StableDiffusion3Backbone(
        mmdit_patch_size=c["patch"],
        mmdit_hidden_dim=c["mmdit_dim"],
        mmdit_num_layers=c["mmdit_layers"],
        mmdit_num_heads=2,
        mmdit_position_size=max(16, image_size // 8 // c["patch"]),
        mmdit_qk_norm=None,
        mmdit_dual_attention_indices=None,
        vae=vae,
        clip_l=clip("clip_l"),
        clip_g=clip("clip_g"),
        latent_channels=4,
        image_shape=(image_size, image_size, 3),
    )


def word_token_ids(captions, length):
    """`<start> words <end> <end>...` ids for the offline CLIP encoders."""
    index = {word: i for i, word in enumerate(WORDS)}
    ids = np.full((len(captions), length), index["<end>"], "int32")
    for row, text in enumerate(captions):
        tokens = ["<start>"] + text.split() + ["<end>"]
        ids[row, : len(tokens)] = [index[t] for t in tokens]
    return {"clip_l": ids, "clip_g": ids}


def encode_captions(backbone, captions, preprocessor):
    """`(context, pooled)` of each caption, numpy, from the CLIP encoders."""
    if preprocessor is None:
        length = backbone.clip_l.max_sequence_length
        tokens = word_token_ids(captions, length)
        empty = word_token_ids([""] * len(captions), length)
    else:
        tokens = preprocessor.generate_preprocess(captions)
        empty = preprocessor.generate_preprocess([""] * len(captions))
    tokens = {k: ops.convert_to_numpy(v) for k, v in tokens.items()}
    empty = {k: ops.convert_to_numpy(v) for k, v in empty.items()}
    context, _, pooled, _ = backbone.encode_text_step(tokens, empty)
    return ops.convert_to_numpy(context), ops.convert_to_numpy(pooled)


def encode_images(backbone, images, batch_size=32):
    """Scaled VAE latents of uint8 images (the SD3 latent space)."""
    latents = []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].astype("float32") / 127.5 - 1.0
        latents.append(ops.convert_to_numpy(backbone.encode_image_step(batch)))
    return np.concatenate(latents)


def flow_matching_batch(latents, caption_ids, contexts, pooled, rng):
    """One rectified-flow batch: inputs at `x_t` and the velocity target."""
    x0 = latents
    noise = rng.normal(size=x0.shape).astype("float32")
    # Logit-normal times (SD3 paper, Sec. 3.1), t in (0, 1).
    t = 1.0 / (1.0 + np.exp(-rng.normal(size=(len(x0), 1))))
    t = t.astype("float32")
    xt = (1.0 - t[:, :, None, None]) * x0 + t[:, :, None, None] * noise
    inputs = {
        "latent": xt,
        "context": contexts[caption_ids],
        "pooled_projection": pooled[caption_ids],
        "timestep": t * 1000.0,  # the backbone's timestep = sigma * 1000
    }
    return inputs, noise - x0


class FlowMatchingData(keras.utils.PyDataset):
    """Fresh noise and times every step, over precomputed latents."""

    def __init__(
        self, latents, caption_ids, contexts, pooled, batch_size, steps, seed
    ):
        super().__init__()
        self.latents, self.caption_ids = latents, caption_ids
        self.contexts, self.pooled = contexts, pooled
        self.batch_size, self.steps, self.seed = batch_size, steps, seed

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        pick = rng.integers(0, len(self.latents), self.batch_size)
        return flow_matching_batch(
            self.latents[pick],
            self.caption_ids[pick],
            self.contexts,
            self.pooled,
            rng,
        )


def sample_latents(diffuser, sigmas, contexts, pooled, noise):
    """Euler integration of the learned flow from noise (t=1) to data (t=0).

    `dx/dt = v(x, t)`, so each step is `x += (t_next - t) * v(x, t)`, on
    the time grid `sigmas` (no classifier-free guidance).
    """
    latents = noise
    for t, t_next in itertools.pairwise(sigmas):
        velocity = diffuser.predict_on_batch(
            {
                "latent": latents,
                "context": contexts,
                "pooled_projection": pooled,
                "timestep": np.full((len(noise), 1), t * 1000.0, "float32"),
            }
        )
        velocity = ops.convert_to_numpy(velocity)
        latents = (latents + (t_next - t) * velocity).astype("float32")
    return latents


def decode(backbone, latents):
    images = ops.convert_to_numpy(backbone.decode_step(latents))
    return np.clip((images + 1.0) * 127.5, 0, 255).astype("uint8")


def nearest_distance(samples, sample_captions, latents, caption_ids):
    """Mean RMS distance of each sample to the nearest training latent
    with its caption: lower means the samples land nearer the data."""
    distances = []
    for sample, cap in zip(samples, sample_captions, strict=False):
        same = latents[caption_ids == cap]
        rms = np.sqrt(((same - sample) ** 2).mean(axis=(1, 2, 3)))
        distances.append(rms.min())
    return float(np.mean(distances))


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"Backend: {keras.config.backend()}")

    # --- Model -------------------------------------------------------------
    if args.preset:
        backbone = keras_hub.models.StableDiffusion3Backbone.from_preset(
            args.preset, image_shape=(args.image_size, args.image_size, 3)
        )
        preprocessor_class = (
            keras_hub.models.StableDiffusion3TextToImagePreprocessor
        )
        preprocessor = preprocessor_class.from_preset(args.preset)
        print(f"Loaded preset {args.preset!r}.")
    else:
        config = "tiny" if args.tiny else "small"
        backbone = offline_backbone(args.image_size, args.seed, config)
        preprocessor = None
        print(
            f"Built a {config} random-weight SD3 (offline); its CLIP "
            "encoders are random too, with a word-level vocabulary."
        )

    # --- Data: digits -> VAE latents, captions -> CLIP embeddings ----------
    num = args.train_images + args.eval_images
    images, digits, colors = digit_images.render_digits(
        num, args.image_size, seed=args.seed
    )
    pairs = sorted(
        {(int(d), int(c)) for d, c in zip(digits, colors, strict=False)}
    )
    captions = [digit_images.caption(d, c) for d, c in pairs]
    caption_ids = np.array(
        [
            pairs.index((int(d), int(c)))
            for d, c in zip(digits, colors, strict=False)
        ]
    )
    contexts, pooled = encode_captions(backbone, captions, preprocessor)
    latents = encode_images(backbone, images)
    n = args.train_images
    train_latents, train_caps = latents[:n], caption_ids[:n]
    eval_latents, eval_caps = latents[n:], caption_ids[n:]
    print(
        f"Data: {n} train / {args.eval_images} held-out digit images "
        f"{images.shape[1:]}, {len(captions)} captions "
        f"(e.g. {captions[0]!r}); latents {latents.shape[1:]}, "
        f"context {contexts.shape[1:]} ({time.time() - start:.1f}s)"
    )

    # A fixed held-out batch (fixed noise and t) to measure the loss.
    rng = np.random.default_rng(args.seed + 1)
    eval_x, eval_y = flow_matching_batch(
        eval_latents, eval_caps, contexts, pooled, rng
    )
    probe = flow_matching_batch(
        train_latents[: args.batch_size],
        train_caps[: args.batch_size],
        contexts,
        pooled,
        rng,
    )
    # Samples: the same start noise and captions before and after.
    sample_caps = train_caps[: args.samples]
    sample_noise = rng.normal(size=(args.samples,) + latents.shape[1:]).astype(
        "float32"
    )

    # --- ReLoRA on the MMDiT -----------------------------------------------
    diffuser = backbone.diffuser
    report = diffuser.enable_relora(rank=args.rank, experts=args.experts)
    print(report)
    diffuser.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        loss="mse",
    )
    loss_before = diffuser.evaluate(eval_x, eval_y, verbose=0)
    # The scheduler's time grid for sampling (shifted, as SD3's).
    backbone.configure_scheduler(args.sample_steps)
    sigmas = ops.convert_to_numpy(backbone.scheduler.sigmas).astype(float)
    before = sample_latents(
        diffuser,
        sigmas,
        contexts[sample_caps],
        pooled[sample_caps],
        sample_noise,
    )

    reducer = keras_relora.ReducerCallback(
        update_layers=args.update_layers,
        interval=args.probe_interval,
        probe_data=probe,
        seed=args.seed,
    )
    data = FlowMatchingData(
        train_latents,
        train_caps,
        contexts,
        pooled,
        args.batch_size,
        args.steps,
        args.seed,
    )
    fit_start = time.time()
    diffuser.fit(
        data, epochs=1, callbacks=[reducer], verbose=0 if args.tiny else "auto"
    )
    fit_time = time.time() - fit_start

    loss_after = diffuser.evaluate(eval_x, eval_y, verbose=0)
    after = sample_latents(
        diffuser,
        sigmas,
        contexts[sample_caps],
        pooled[sample_caps],
        sample_noise,
    )

    # --- Results -----------------------------------------------------------
    print(
        f"Flow-matching loss (velocity MSE) on {args.eval_images} "
        f"held-out images, fixed noise and t: before {loss_before:.4f}, "
        f"after {loss_after:.4f} ({args.steps} steps, {fit_time:.1f}s)"
    )
    dist_before = nearest_distance(
        before, sample_caps, train_latents, train_caps
    )
    dist_after = nearest_distance(after, sample_caps, train_latents, train_caps)
    print(
        f"{args.samples} samples ({args.sample_steps} Euler steps): RMS "
        "distance to the nearest training latent of their caption: "
        f"before {dist_before:.4f}, after {dist_after:.4f}"
    )
    print(
        f"Block importance (Reducer): "
        f"{np.round(reducer.importance.astype(float), 4).tolist()}"
    )

    paths = {}
    shown = images[: args.samples]
    reference = np.concatenate([shown, decode(backbone, latents[: len(shown)])])
    paths["reference"] = digit_images.save_grid(
        reference,
        os.path.join(args.output_dir, "reference.png"),
        columns=len(shown),
    )
    paths["before"] = digit_images.save_grid(
        decode(backbone, before),
        os.path.join(args.output_dir, "samples_before.png"),
        columns=len(shown),
    )
    paths["after"] = digit_images.save_grid(
        decode(backbone, after),
        os.path.join(args.output_dir, "samples_after.png"),
        columns=len(shown),
    )
    paths["importance"] = os.path.join(args.output_dir, "importance.png")
    reducer.plot(paths["importance"])
    paths["adapters"] = os.path.join(args.output_dir, "adapters.safetensors")
    keras_relora.save_relora_weights(diffuser, paths["adapters"])
    with open(os.path.join(args.output_dir, "captions.txt"), "w") as f:
        f.write("\n".join(captions[c] for c in sample_caps) + "\n")

    print(f"Outputs in {args.output_dir}/:")
    print(
        "  reference.png        training images (top) and their VAE "
        "reconstructions (bottom)"
    )
    print("  samples_before.png   samples of the base model")
    print("  samples_after.png    samples after ReLoRA (same noise)")
    print("  captions.txt         the samples' captions, in order")
    print("  importance.png       Reducer block importance over training")
    print("  adapters.safetensors the trained adapters only")
    if not args.preset:
        print(
            "  (The VAE has random weights: its decodings are not "
            "pictures of digits. Use --preset for real weights.)"
        )
    print(f"Done in {time.time() - start:.1f}s.")
    return {
        "loss_before": float(loss_before),
        "loss_after": float(loss_after),
        "distance_before": dist_before,
        "distance_after": dist_after,
        "paths": paths,
    }


if __name__ == "__main__":
    main()
