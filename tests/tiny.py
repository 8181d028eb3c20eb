"""Flags for tiny end-to-end runs of any method script (seconds on a CPU), shared by the tests."""

TINY = ["--synth-train", "256", "--steps", "6", "--batch-size", "16", "--log-every", "2", "--warmup", "2",
        "--image-size", "32", "--cnn-width", "8", "--text-width", "32", "--text-layers", "1", "--embed-dim", "16",
        "--probe-train", "64", "--max-eval", "64", "--num-workers", "0"]


def tiny_args(out_dir, *extra):
    """TINY plus an output folder and any extra flags (later flags win)."""
    return [*TINY, "--out", str(out_dir), *map(str, extra)]
