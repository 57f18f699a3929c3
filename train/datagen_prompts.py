"""What the teacher is asked: per kind of instruction data, a system prompt and hand-written few-shot
seeds (user: an image's symbolic representation, assistant: the response wanted), in the style of
the LLaVA paper's tables 10-12; and the paper's instructions for detailed descriptions (table 9).

    msgs = teacher_messages("conversation", image_context, n_seeds=2)
    # [system, user (seed context), assistant (seed response), ..., user (this image)]

The kinds:
- conversation: several "Question: / Answer:" pairs, answered as if seeing the image;
- detail: a detailed description; the human turn is one of DETAIL_INSTRUCTIONS;
- reasoning: one question that needs step-by-step reasoning, and its answer.
Consecutive prompts of one kind share the system prompt and seeds, whose KV cache the teacher keeps.
"""
from __future__ import annotations

from llava_local.prompts.templates import Message

from .coco_annotations import ImageContext, symbolic

KINDS = ("conversation", "detail", "reasoning")

# Paper, table 9 (the instructions of the detailed-description kind).
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)


_SYSTEM_HEAD = ("You are an AI visual assistant looking at a single image. You are given the image's "
                "captions and its objects with bounding boxes as (x0, y0, x1, y1) in 0-1 coordinates, "
                "top left (0, 0). Answer as if you see the image; never mention captions or coordinates. ")

SYSTEM_PROMPTS = {
    "conversation": _SYSTEM_HEAD + (
        "Write a conversation between a person asking about the image and you answering. Ask about "
        "the objects, their colours, how many there are and where they are. Only ask questions the "
        "image answers for sure. Write 2 to 4 pairs, each as 'Question: ...' then 'Answer: ...'."),
    "detail": _SYSTEM_HEAD + (
        "Describe the image in detail in one paragraph: the objects, their colours, how many there "
        "are and where they are relative to each other."),
    "reasoning": _SYSTEM_HEAD + (
        "Write one question about the image that needs reasoning beyond naming what is visible "
        "(relations between objects, what they suggest), then a clear answer that reasons step by "
        "step. Write it as 'Question: ...' then 'Answer: ...'."),
}

SEED_CONTEXTS = (
    "A man rides a bicycle down a city street next to a red bus.\n"
    "A cyclist passes a double-decker bus.\n"
    "person: [0.412, 0.301, 0.538, 0.874]\nbicycle: [0.398, 0.552, 0.571, 0.902]\nbus: [0.612, 0.118, 0.998, 0.861]",
    "Two cats sleep on a blue sofa beside a lamp.\n"
    "A living room with two cats curled up on a couch.\n"
    "cat: [0.102, 0.455, 0.371, 0.702]\ncat: [0.398, 0.471, 0.640, 0.698]\ncouch: [0.031, 0.352, 0.815, 0.947]\n"
    "lamp: [0.852, 0.088, 0.979, 0.611]",
)

SEED_RESPONSES = {
    "conversation": (
        "Question: What is the man riding?\nAnswer: The man is riding a bicycle.\n"
        "Question: What vehicle is next to him?\nAnswer: A red double-decker bus is next to him, on the right.\n"
        "Question: Where is the bus?\nAnswer: The bus is on the right side of the image.",
        "Question: How many cats are there?\nAnswer: There are two cats.\n"
        "Question: What are the cats doing?\nAnswer: They are sleeping on a blue sofa.\n"
        "Question: What is to the right of the sofa?\nAnswer: A lamp stands to the right of the sofa.",
    ),
    "detail": (
        "A man rides a bicycle down a city street in the middle of the image. To his right, a large red "
        "double-decker bus fills most of the right side of the picture. The cyclist is much smaller than "
        "the bus and rides close beside it.",
        "A living room with a blue sofa across the lower part of the image. Two cats are curled up asleep "
        "next to each other on the left half of the sofa. A tall lamp stands at the right edge, beside the sofa.",
    ),
    "reasoning": (
        "Question: Why should the cyclist be careful?\nAnswer: He rides right next to a large bus. The bus "
        "is much bigger than him and its driver may not see him, so he should keep his distance.",
        "Question: Why are the cats likely comfortable?\nAnswer: They lie on a soft sofa next to each "
        "other and they are asleep, so the place is warm and quiet for them.",
    ),
}


def teacher_messages(kind: str, ctx: ImageContext, n_seeds: int = 2) -> list[Message]:
    """The system prompt of `kind`, `n_seeds` seed exchanges, then this image's symbolic representation."""
    msgs = [Message("system", SYSTEM_PROMPTS[kind])]
    for c, r in list(zip(SEED_CONTEXTS, SEED_RESPONSES[kind]))[:n_seeds]:
        msgs += [Message("user", c), Message("assistant", r)]
    msgs.append(Message("user", symbolic(ctx)))
    return msgs
