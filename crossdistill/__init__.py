"""crossdistill: few-shot network compression by cross distillation (Bai et al., AAAI 2020).

from crossdistill import load_checkpoint, load_few_shot, compress, evaluate
teacher, meta = load_checkpoint("teachers/resnet20_fashion-mnist.safetensors")
images, _ = load_few_shot("fashion-mnist", k=5, seed=0)
student, report = compress(teacher, images, method="ours", keep=0.5)
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .compress import compress
from .config import CompressConfig
from .data import load_dataset, load_few_shot, load_image_folder
from .errors import UserError
from .evaluate import evaluate
from .inference import optimize_for_inference
from .methods import ALL_METHODS, run_method
from .mir import MirConfig, mir_refine
from .models import get_model, list_models
from .run import CompressReport
from .student import save_student

__version__ = "0.1.0"
__all__ = [
    "ALL_METHODS",
    "CompressConfig",
    "CompressReport",
    "UserError",
    "compress",
    "evaluate",
    "get_model",
    "list_models",
    "load_checkpoint",
    "load_dataset",
    "load_few_shot",
    "load_image_folder",
    "optimize_for_inference",
    "run_method",
    "save_checkpoint",
    "save_student",
    "__version__",
    "MirConfig",
    "mir_refine",
]
