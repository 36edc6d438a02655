"""Offline batch pipelines on Ray: the stage model, the daily DAG, batch scoring (docs/pipelines.md).

    stage.py, workspace.py, dag.py   date-partitioned stages, markers, atomic commits, run/backfill
    daily.py + steps/                ingest -> embed -> store -> samples -> train -> evaluate -> promote -> score
    batch_score.py                   Ray Data scoring with the online Ranker
    cli.py                           `muse pipeline run | backfill | status`
"""
