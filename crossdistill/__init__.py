"""crossdistill: few-shot network compression by cross distillation (Bai et al., AAAI 2020)."""

from .errors import UserError
from .models import get_model, list_models

__version__ = "0.1.0"
__all__ = ["UserError", "get_model", "list_models", "__version__"]
