"""The heat map of the Reducer's block importance over training steps."""

import numpy as np


def heat_map(steps, importance, path):
    """Writes a block x step heat map of `importance` to `path`.

    Args:
        steps: int array `(T,)`: the training step of each row.
        importance: float array `(T, L)`.
        path: str. The image file to write.

    Returns:
        The matplotlib `Figure`.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "`ReducerCallback.plot` needs matplotlib: `pip install matplotlib`."
        ) from None
    figure = Figure(
        figsize=(max(4, len(steps) * 0.3 + 2), 3 + 0.15 * importance.shape[1])
    )
    axes = figure.subplots()
    image = axes.imshow(
        importance.T,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        interpolation="nearest",
    )
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round()
    axes.set_xticks(ticks)
    axes.set_xticklabels([str(steps[int(t)]) for t in ticks])
    axes.set_xlabel("training step")
    axes.set_ylabel("block")
    axes.set_title("ReLoRA block importance (-scores)")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path)
    return figure
