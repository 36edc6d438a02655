"""MUSE recommender pipeline: data contracts, stores, embeddings, GSU, ESU, training, serving."""
