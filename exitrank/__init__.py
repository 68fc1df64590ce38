"""exitrank: retrieval-augmented LLM CTR ranking with multi-head early exit.

Shared pieces used by every process: the generated gRPC stubs (``exitrank.v1``), the plain data
types passed between the retriever, the ranker and the trainer (``exitrank.types``), the
artifact manifest (``exitrank.artifacts``) and the embedded Redis launcher (``exitrank.redis_server``).
"""

__version__ = "0.1.0"
