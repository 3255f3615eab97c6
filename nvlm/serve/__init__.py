"""OpenAI-compatible serving: `nvlm serve` = FastAPI + uvicorn over `Pipeline` (prompts) and `Engine` (batching).

    from nvlm.serve import create_app, ServeOptions
    app = create_app(pipe, engine, ServeOptions(model_name="nvlm-d"))

Needs the `serve` extra (fastapi, uvicorn).
"""

from .app import ServerThread, create_app, render_metrics
from .protocol import APIError, ServeOptions

__all__ = ["APIError", "ServeOptions", "ServerThread", "create_app", "render_metrics"]
