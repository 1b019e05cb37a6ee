"""Errors of source-model loading."""


class ModelError(ValueError):
    """A model that cannot be loaded: missing path, missing package, unreachable or unusable id."""


def call_loader(model: str, verb: str, load):
    """Run a transformers loader, turning its failures into one-line ModelErrors naming `model`."""
    try:
        return load()
    except ModelError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ModelError(f"cannot {verb} {model!r}: {msg[0] if msg else type(e).__name__}") from None
