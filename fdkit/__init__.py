"""fdkit: deploy ERNIE 4.5 on PaddlePaddle from a notebook, a Hydra config or an OpenAI-compatible server."""

from fdkit.config import load_config
from fdkit.engine.llm_engine import RequestOutput
from fdkit.engine.sequence import SamplingParams
from fdkit.llm import LLM

__all__ = ["LLM", "RequestOutput", "SamplingParams", "load_config"]
__version__ = "0.1.0"
