"""Prompts with a name: LLaVA-1.5's response-format prompts (paper, Table 7) for its caption
benchmarks, used by `caption --prompt short|detailed` and by the demo model's training data."""
from __future__ import annotations

PROMPTS = {
    "short": "Provide a one-sentence caption for the provided image.",
    "detailed": "Describe this image in detail.",
}
