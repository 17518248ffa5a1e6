"""The model listing, read without torch, so that ``twins-deploy models`` answers at once.

Its rows (names, aliases, family, parameters, GFLOPs at the default input size, where weights come
from) are what ``twins_deploy.models.model_table()`` counts by building every model on the meta
device: about 10 s, two of them importing torch. They are kept in ``data/models.json``, one row a
line; after a model or the registry changes, ``python -m twins_deploy.catalogue`` writes the file
again, and ``tests/test_first_minutes.py`` fails until it equals a fresh count.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

CATALOGUE = "models.json"  # in twins_deploy/data


def model_rows() -> list[dict]:
    """One row per registered model, as ``model_table()`` counted them."""
    return json.loads(resources.files("twins_deploy.data").joinpath(CATALOGUE).read_text())["models"]


def write_catalogue(path: str | Path | None = None) -> list[dict]:
    """Count every registered model (slow: builds them) and write the rows ``model_rows`` reads."""
    from twins_deploy.files import atomic_output
    from twins_deploy.models import model_table

    rows = model_table()
    path = Path(path) if path else Path(__file__).parent / "data" / CATALOGUE
    with atomic_output(path) as tmp:
        tmp.write_text('{"models": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n]}\n")
    return rows


if __name__ == "__main__":
    print(f"wrote {len(write_catalogue())} models to twins_deploy/data/{CATALOGUE}")
