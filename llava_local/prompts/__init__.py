"""Prompts: the chat-template registry (templates.py), the sandboxed rendering of a GGUF's own
template (render.py), and the one prompt builder every path uses (turns.py)."""
