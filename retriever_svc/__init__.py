"""retriever_svc: the GCN-Retriever service (the paper's section 4) behind ``exitrank.v1.Retriever``.

Layers, imports flowing one way (servicer → core → model):

- ``embeddings.py`` ``GCNEmbeddings``: the fit's output, saved/loaded as safetensors + meta.json
- ``vectors.py``    ``VectorIndex``: cosine nearest neighbours over FAISS (no I/O; also used offline)
- ``records.py``    plain request/record types and their validation
- ``store.py``      all Redis I/O (stream, histories, catalog, embedding versions)
- ``index.py``      the core ``Retriever`` (no grpc): ingest, fold-in, nearest users, contexts
- ``consumer.py``   the stream consumer group applying events to histories and embeddings
- ``servicer.py``   the thin grpc.aio servicer; ``server.py`` the ``retriever-svc`` CLI and lifecycle

Importing the package imports nothing heavy: the service never needs torch. The LightGCN model and
its fit are the trainer's (``trainer.gcn_model``, ``trainer.bpr``, ``trainer.gcn``).
"""
