"""exitrank ranker service: an early-exit decoder LLM that scores CTR from a retrieval-augmented prompt.

Layers (imports flow one way): ``server``/``servicer``/``retriever_client`` (grpc) -> ``reload``/``ranker``
(core ``Ranker``: the asynchronous request path) -> ``batching``, ``scoring`` (``Scorer``: the synchronous
model side) -> ``engine``/``onnx_engine`` -> ``runners`` -> ``model``/``exits``/``prefix``/``prompt``/``artifact``
(torch + transformers only).
"""
