"""The stage on real MovieLens-100K: the Star Wars sequels are Star Wars' neighbours.

Slow (the whole stage on 1,682 items, several minutes on 2 cores): run with `pytest -m slow`.
"""
from __future__ import annotations

import pytest

from recsys.cli import main


@pytest.mark.slow
def test_star_wars_neighbours_are_its_sequels(tmp_path_factory, capsys):
    from pipelines.embed_items import embed_items
    from recsys.data.movielens import load_movielens

    layout = load_movielens(tmp_path_factory.mktemp("ml100k"))
    embed_items(layout)
    capsys.readouterr()
    assert main(["similar", "--data", str(layout.root), "Star Wars", "-k", "10"]) == 0
    out = capsys.readouterr().out
    assert "Empire Strikes Back" in out and "Return of the Jedi" in out
