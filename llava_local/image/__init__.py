"""Images: decoding with limits (load.py) and CLIP preprocessing as LLaVA trains (preprocess.py)."""
