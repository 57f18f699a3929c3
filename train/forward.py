"""The training forward of LLaVA, and the closed-vocabulary mode of tiny demo LLMs.

    core = LlavaForTraining(model)                  # or LlavaForTraining(model, output_vocab=ids)
    loss_sum = core(input_ids, labels, attention_mask, pixel_values)
    core.sync_vocab()                               # before saving `model`

Image features (CLIP layer -2, CLS dropped, projected: LLaVA-1.5) replace the embeddings at the
IMAGE_PLACEHOLDER positions; the LM head runs only where there is a label, so a 49k-token
vocabulary costs nothing on prompt and image tokens. The loss is *summed* over labelled tokens:
the loop divides by the global count, so gradient accumulation and DDP give one big batch's update.

Closed vocabulary (`output_vocab`, the ids in a checkpoint's output_vocab.json): for an LLM whose
embedding rows outside these ids are exactly zero (a model for a closed language, e.g. one that
uses a few hundred of a 49152-token general vocabulary; the demo model: 138 of its own 512), every
other token's logit is exactly 0, so the full softmax equals the softmax over the kept ids plus one
column holding log(n_other). Training then uses a compact copy of the kept rows as the trainable
parameter (the full matrices are frozen meanwhile and updated by `sync_vocab`): the same model and
loss, without a full-vocabulary gradient and optimizer state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, IMAGE_PLACEHOLDER
from .errors import TrainDataError
from .model import parts


class LlavaForTraining(nn.Module):
    def __init__(self, llava, output_vocab: list[int] | None = None):
        super().__init__()
        self.llava = llava
        self.closed = output_vocab is not None
        if not self.closed:
            return
        emb = llava.get_input_embeddings().weight
        head = llava.get_output_embeddings().weight
        ids = torch.tensor(sorted(set(output_vocab)), dtype=torch.long, device=emb.device)
        outside = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
        outside[ids] = False
        if bool(emb.detach()[outside].any()) or bool(head.detach()[outside].any()):
            raise TrainDataError("output_vocab.json is set but embedding rows outside it are not zero")
        lookup = torch.full((emb.shape[0],), -1, dtype=torch.long, device=emb.device)
        lookup[ids] = torch.arange(len(ids), device=emb.device)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)
        self.log_n_other = math.log(max(1, emb.shape[0] - len(ids)))
        self.tied = head is emb
        self.embed_rows = nn.Parameter(emb.detach()[ids].clone(), requires_grad=emb.requires_grad)   # (n_kept, D)
        self.head_rows = self.embed_rows if self.tied else nn.Parameter(head.detach()[ids].clone(),
                                                                        requires_grad=head.requires_grad)
        emb.requires_grad_(False)      # while training, their kept rows live in embed_rows / head_rows
        head.requires_grad_(False)

    @torch.no_grad()
    def sync_vocab(self) -> None:
        """Write the trained compact rows back into the model's full embedding (and LM head)."""
        if not self.closed:
            return
        self.llava.get_input_embeddings().weight[self.ids] = self.embed_rows.detach()
        if not self.tied:
            self.llava.get_output_embeddings().weight[self.ids] = self.head_rows.detach()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision, proj, _ = parts(self.llava)
        layer = self.llava.config.vision_feature_layer
        train_vision = any(p.requires_grad for p in vision.parameters())
        with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
            out = vision(pixel_values, output_hidden_states=True)
            h = out.hidden_states[layer][:, 1:]          # (N, P, D_vision): CLS dropped
        return proj(h.to(proj.linear_1.weight.dtype))    # (N, P, D_text)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.closed:
            return parts(self.llava)[2].get_input_embeddings()(input_ids.clamp(min=0))   # (B, T, D)
        text = (input_ids >= 0) & attention_mask.bool()
        if bool((self.lookup[input_ids[text]] < 0).any()):
            raise TrainDataError("an input token outside output_vocab.json occurs in the data")
        return F.embedding(self.lookup[input_ids.clamp(min=0)].clamp(min=0), self.embed_rows)   # (B, T, D)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, turn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/labels/attention_mask (B, T) as data.collate makes them; turn_mask (B, 1, T, T) and
        position_ids (B, T) for records with independent turns."""
        _, proj, lm = parts(self.llava)
        image_mask = input_ids == IMAGE_PLACEHOLDER                           # (B, T)
        embeds = self.embed(input_ids, attention_mask)                        # (B, T, D)
        if pixel_values is not None:
            feats = self.image_features(pixel_values)                         # (N, P, D)
            if feats.shape[0] * feats.shape[1] != int(image_mask.sum()):
                raise TrainDataError(f"{int(image_mask.sum())} image positions for {feats.shape[0]} images of "
                                 f"{feats.shape[1]} tokens")
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), feats.to(embeds.dtype))
        else:
            # keep the projector in the graph (DDP expects every trainable parameter to get a gradient)
            embeds = embeds + 0.0 * proj(embeds.new_zeros(1, proj.linear_1.in_features)).sum()
        h = lm(inputs_embeds=embeds, attention_mask=attention_mask if turn_mask is None else turn_mask,
               position_ids=position_ids, use_cache=False).last_hidden_state                # (B, T, D)
        target = labels[:, 1:]                                                # position t predicts token t+1
        keep = target != IGNORE_INDEX
        hk, tk = h[:, :-1][keep], target[keep]                                # (n_labelled, D), (n_labelled,)
        if not self.closed:
            logits = self.llava.lm_head(hk)                                   # (n_labelled, vocab)
            return F.cross_entropy(logits.float(), tk, reduction="sum")
        if bool((self.lookup[tk] < 0).any()):
            raise TrainDataError("a target token outside output_vocab.json occurs in the data")
        logits = (hk @ self.head_rows.T).float()                              # (n_labelled, n_kept)
        rest = logits.new_full((logits.shape[0], 1), self.log_n_other)       # every other token: logit 0
        return F.cross_entropy(torch.cat([logits, rest], 1), self.lookup[tk], reduction="sum")
