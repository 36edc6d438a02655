"""Item encoders (text, image, co-occurrence) and their contrastive alignment into one vector.

The Ray stage that runs them over a catalogue is `pipelines/embed_items.py`; see docs/embeddings.md.
"""
