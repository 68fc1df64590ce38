"""exitrank ranker service: an early-exit decoder LLM that scores CTR from a retrieval-augmented prompt.

Layers (imports flow one way): ``servicer``/``server``/``retriever_client`` (grpc) -> ``ranker``
(core ``Ranker``) -> ``model``/``exits``/``prompt``/``artifact`` (torch + transformers only).
"""
