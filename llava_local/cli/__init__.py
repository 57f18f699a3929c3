"""The `llava-local` command (click): the only code that imports click, train/ or convert/."""
from llava_local.cli.main import main  # noqa: F401  (the console script is llava_local.cli:main)
