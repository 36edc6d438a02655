"""store: yesterday's SequenceStore + the day's events -> today's store (most recent N per user).

Output: store/ (SequenceStore files). Dense ids stay valid because the vocabularies only grow
(`Vocab.extend`), so the merge appends to each user's history instead of rebuilding it.
"""
from __future__ import annotations

from pipelines.stage import StageContext
from pipelines.steps.ingest import previous_layout
from recsys.data.folder import item_categories, load_vocabs
from recsys.paths import DataLayout
from recsys.store.sequence_store import SequenceStore


def run(ctx: StageContext) -> None:
    prev = previous_layout(ctx, "store")
    day = DataLayout(ctx.input("ingest"))
    vocabs = load_vocabs(day)
    store = SequenceStore.merge(
        prev.store_dir,
        day.events,
        ctx.output / "store",
        user_vocab=vocabs["user_id"],
        item_vocab=vocabs["item_id"],
        item_categories=item_categories(day, vocabs),
        max_per_user=ctx.config.max_history,
    )
    ctx.rows.update(users=store.num_users, behaviours=store.num_behaviours)
