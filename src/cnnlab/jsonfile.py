"""Reading the JSON files cnnlab writes (result.json, metrics.jsonl, eval.json, a dataset's
source.json): a file that is damaged, not UTF-8, or not the JSON objects cnnlab wrote is one
``CnnlabError`` naming the file and the fix, never a traceback from deep inside a command."""

from __future__ import annotations

import json
from pathlib import Path

from cnnlab.errors import CnnlabError


def read_object(path: Path, fix: str = "") -> dict:
    """The JSON object in ``path``; ``fix`` (e.g. "re-run `cnnlab train` for this run") ends the error."""
    return _parse(str(path), Path(path).read_bytes(), fix)


def read_lines(path: Path, fix: str = "") -> list[dict]:
    """One JSON object per non-blank line of ``path`` (JSON Lines)."""
    lines = Path(path).read_bytes().splitlines()
    return [_parse(f"{path} line {n}", line, fix) for n, line in enumerate(lines, 1) if line.strip()]


def _parse(where: str, data: bytes, fix: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CnnlabError(f"{where}: damaged (not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as e:
        raise CnnlabError(f"{where}: damaged JSON ({e}); {fix}") from None
    except RecursionError:  # arrays nested thousands deep
        raise CnnlabError(f"{where}: damaged JSON (nested too deeply); {fix}") from None
    if not isinstance(value, dict):
        raise CnnlabError(f"{where}: damaged (a JSON {type(value).__name__}, expected an object); {fix}")
    return value
