"""comeba: consecutive batch model editing with hook layers (COMEBA-HK).

    import comeba
    editor = comeba.Editor(model, tokenizer, comeba.HParams(), corpus=comeba.text_corpus(["valid.txt"]))
    editor.edit([{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}])
    editor.save_pretrained("edits")
    handle = comeba.load_edits(model, "edits")       # inference: hooks on, no tokenizer needed

The names below are imported on first use, so `import comeba` (and the CLI's help) stay quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Editor": "editor",
    "EditError": "editor",
    "HParams": "hparams",
    "HParamsError": "hparams",
    "load_edits": "adapter",
    "AppliedEdits": "adapter",
    "StateError": "adapter",
    "Request": "requests",
    "RequestError": "requests",
    "text_corpus": "corpus",
    "load_model": "models",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'comeba' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
