"""Every test here imports lora_engine.train, which reads images with pillow (the train extra): without it the
whole folder is skipped with the reason."""
from tests.optional import require

require("PIL")
