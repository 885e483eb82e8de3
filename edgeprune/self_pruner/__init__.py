"""Self-Pruner: LLM-driven (or classical) evolutionary search of layer-wise pruning rates. See :mod:`.search`
(space, repair, loop, log/resume) and :mod:`.backends` (who proposes candidates)."""
from .backends import (BackendOptions, GABackend, LlamaCppBackend, LLMBackend, OpenAIBackend,  # noqa: F401
                       ProposalBackend, ScriptedBackend, make_backend, parse_reply)
from .search import Individual, SearchConfig, SearchResult, Space, repair, search  # noqa: F401
