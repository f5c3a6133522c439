"""Figures are optional: matplotlib comes with the `plots` extra (`pip install 'trl-moe-grpo[plots]'`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MoEGRPOError


def has_matplotlib() -> bool:
    """Whether figures can be drawn here."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # present in `sys.modules` as `None`: blocked
        return False


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend (figures are written to files, never shown)."""
    try:
        import matplotlib
    except ImportError as error:
        raise MoEGRPOError(
            "Drawing figures needs matplotlib, which is optional: `pip install 'trl-moe-grpo[plots]'`."
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out `fig`, write it to `path` (folders created) and free it."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
