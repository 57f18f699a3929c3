"""File formats, read and checked before anything trusts them: GGUF names and checks, safetensors
checks, the mmproj's vision/projector description, the model manifest. Imports only errors/fileio."""
