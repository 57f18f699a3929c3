"""Domain errors raised by the llava-local library.

The CLI turns every `LlavaLocalError` into one `Error: ...` line (see cli.py); anything else is a
bug and shows a traceback only with `--debug`.
"""


class LlavaLocalError(Exception):
    """Base class: a problem the user can fix (a bad file, a wrong option)."""


class ModelFilesError(LlavaLocalError):
    """A GGUF / safetensors / checkpoint / ONNX file is missing, truncated, malformed or mismatched."""


class ImageError(LlavaLocalError):
    """An image cannot be read safely (missing, truncated, unsupported format, too large)."""


class ContextOverflowError(LlavaLocalError):
    """The prompt plus image tokens do not fit in the context window."""


class ConversionError(LlavaLocalError):
    """A checkpoint cannot be converted (unsupported layout or configuration)."""


class TemplateError(LlavaLocalError):
    """A chat template is unknown, unsafe or failed to render."""


class BackendUnavailableError(LlavaLocalError):
    """A requested vision backend cannot run here (missing package or build)."""


class StructuredOutputError(LlavaLocalError):
    """A JSON-schema answer was cut before the JSON closed, or is not valid against the schema."""
