"""Reading a JSON object file a tool wrote (a manifest, a config.json), with one-line errors that name the file."""
from __future__ import annotations

import json
from typing import Any, Dict


def read_json_object(path: str, expected: str) -> Dict[str, Any]:
    """The JSON object in ``path``; a file that cannot be read, is not JSON or holds another JSON value is one
    error naming ``path`` and what was ``expected`` there."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot be read ({err.strerror}); expected {expected}") from None
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err}); expected {expected}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: a JSON {type(value).__name__}; expected {expected}")
    return value
