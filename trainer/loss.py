"""The training objective: next-token cross-entropy on trained (label != -100) positions only.

Only trained positions ever reach the loss: their hidden states are picked out before the
vocabulary projection (and, with trainer/speedups/last_layer.py's hooks on the model, the last
decoder layer's output projection and MLP run on those alone). With a frozen output layer (the
usual case: the head is part of the base), `FrozenHeadCrossEntropy` projects, takes the loss and
the gradient for the hidden states in one pass over row chunks: no [tokens x vocab] logits are kept
and nothing is recomputed in the backward. Otherwise (an adapted or partitioned head) the projection
+ cross-entropy run in chunks under activation checkpointing when the logits would be large, and
in one go (kept for the backward) when small.

The logits are the model's own: what its `*ForCausalLM.forward` does to the head's output before its
loss (Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2 caps them,
`final_logit_softcapping`: see LOGIT_TRANSFORMS) is done here too, in both paths, and a model whose
forward changes them in a way not known here is refused when the loss is built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.data import packing
from trainer.model.base import ModelLoadError
from trainer.speedups import last_layer, onednn
from trainer.speedups.packed_attention import PACKED_ATTENTION
from trainer.data.examples import IGNORE_INDEX


class CausalLMLoss(nn.Module):
    """Wraps a causal LM; forward returns (sum of token losses, number of trained tokens).

    Takes `trainer.data.batching.collate`'s batch, or `trainer.data.packing.collate_packed`'s: per-example
    `position_ids`, `segment_lengths`, and (unless attention runs per example) a [rows, 1, L, L]
    boolean mask. Give the batch on the CPU (as the collate makes it): what needs reading on the
    host (segment lengths, which positions are trained) is read there, and only then do the
    tensors go to the model's device, so a GPU never waits on the CPU inside a forward pass.

    Without `labels` it is the wrapped model's forward (decoding): under ZeRO-3 every forward must
    enter through this module, the one DeepSpeed wraps, whose hook resets DeepSpeed's per-forward
    parameter bookkeeping."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.logit_scale, self.logit_softcap = logit_transform(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_lengths: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if labels is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              **kwargs)
        device = self.model.get_input_embeddings().weight.device
        attention = self.model.config._attn_implementation
        extra = {}
        if segment_lengths is not None and attention == PACKED_ATTENTION:
            # Attention per example reads the examples' lengths: no mask, no padding.
            lengths = segment_lengths.tolist()  # on the CPU, from the collate: no device sync
            input_ids, position_ids, labels = packing.unpad(lengths, input_ids, position_ids, labels)
            attention_mask = None
            extra["packed_lengths"] = [n for row in lengths for n in row if n]
        elif attention_mask is not None and attention_mask.dim() == 4 and attention == "eager":
            # Eager attention adds the mask to the scores; SDPA takes the boolean mask as is.
            attention_mask = additive_mask(attention_mask, self.model.get_input_embeddings().weight.dtype)
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        # Trained positions in the flattened [rows x L]: position t predicts token t + 1.
        index = F.pad(trained, (0, 1)).flatten().nonzero().squeeze(1)
        targets = targets[trained]
        positions = (trained.shape[0], trained.shape[1] + 1)
        input_ids, attention_mask, position_ids, index, targets = (
            None if t is None else t.to(device, non_blocking=True)
            for t in (input_ids, attention_mask, position_ids, index, targets))
        with last_layer.only(self.model, index, positions):
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=position_ids, use_cache=False, **extra).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        return chunked_cross_entropy(self.model.get_output_embeddings(), hidden, targets, self.chunk_tokens,
                                     scale=self.logit_scale, softcap=self.logit_softcap)


# What each class's forward (transformers 5) does to its head's output before taking the loss: how, and
# the text config's attribute holding the value. MiniCPM3 and Inkling divide the hidden state before their
# bias-free head instead: the same map. The loss here runs the decoder and the head itself, so it must do the same.
LOGIT_TRANSFORMS = {
    **dict.fromkeys(["GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
                     "GraniteMoeSharedForCausalLM", "GraniteMoeHybridForCausalLM", "MiniCPM3ForCausalLM"],
                    ("divide", "logits_scaling")),
    **dict.fromkeys(["InklingForCausalLM", "InklingForConditionalGeneration"], ("divide", "logits_mup_width_multiplier")),
    **dict.fromkeys(["CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM"],
                    ("multiply", "logit_scale")),
    "HyperCLOVAXForCausalLM": ("multiply", "logits_scaling"),
    "FalconH1ForCausalLM": ("multiply", "lm_head_multiplier"),
    # cap * tanh(logits / cap), where the config sets a cap (Gemma 2's is 30; Gemma 3's is None).
    **dict.fromkeys(["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma3nForConditionalGeneration",
                     "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForCausalLM",
                     "Gemma4UnifiedForConditionalGeneration", "VaultGemmaForCausalLM", "NanoChatForCausalLM",
                     "BeamForCausalLM", "Inkling2ForCausalLM", "Inkling2LoopForCausalLM"],
                    ("softcap", "final_logit_softcapping")),
    "RecurrentGemmaForCausalLM": ("softcap", "logits_soft_cap"),
}
# The settings other forwards apply to the logits, and the value that changes nothing: a class not above
# with one set otherwise is refused rather than trained on other logits than its own forward's.
LOGIT_SETTINGS = {"final_logit_softcapping": None, "logits_soft_cap": None, "output_logit_soft_cap": None,
                  "logit_scale": 1, "logits_scaling": 1, "lm_head_multiplier": 1, "output_multiplier": 1}


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap): the model's forward turns its head's output z into softcap * tanh(scale * z /
    softcap), or scale * z when softcap is None. (1.0, None) for Llama and most others: the head's output as is."""
    config = model.config.get_text_config()
    name = type(model).__name__
    rows = getattr(model.get_output_embeddings(), "out_features", None)  # the full count under ZeRO-3 too
    unpadded = getattr(config, "unpadded_vocab_size", None)
    if unpadded is not None and rows is not None and unpadded < rows:
        raise ModelLoadError(f"{name} keeps only the first unpadded_vocab_size={unpadded} of its head's {rows} "
                             f"logits; this trainer's loss takes them all (trainer/loss.py), so training would "
                             f"optimise something other than the model's own loss")
    how, attribute = LOGIT_TRANSFORMS.get(name, (None, None))
    value = getattr(config, attribute, None) if attribute else None
    if how == "divide" and value is not None:
        return 1.0 / value, None
    if how == "multiply" and value is not None:
        return float(value), None
    if how == "softcap" and value is not None:
        return 1.0, float(value)
    for setting, neutral in LOGIT_SETTINGS.items():
        value = getattr(config, setting, None)
        if setting != attribute and value is not None and value != neutral:
            raise ModelLoadError(f"{name} sets {setting}={value}: its forward may change the logits with it in a way "
                                 f"this trainer's loss does not know (trainer/loss.py, LOGIT_TRANSFORMS), so training "
                                 f"would optimise something other than the model's own loss")
    return 1.0, None


# Logits up to this many elements are kept rather than recomputed in chunks: 64 MiB in fp32, and
# about as much again for the log-softmax the backward keeps (plus the compute-dtype logits).
KEEP_LOGITS_UP_TO = 2**24
# Logits computed at once by FrozenHeadCrossEntropy: ~32 MB of fp32, about 170 rows of a 49k vocabulary
# (measured fastest on a 2-core CPU among 64, 170 and 400 rows: small enough to stay in cache, large
# enough for an efficient product).
FUSED_LOGITS_PER_CHUNK = 2**23
# On a GPU no cache is to be kept within, and each chunk costs a dozen kernel launches: ~128 MB of fp32
# logits (~680 rows of a 49k vocabulary, 1,048 of a 32k one) keeps them few and the product's rows many,
# for ~0.4 GB of memory at the peak of the loss. Not measured yet (no GPU has been lent).
FUSED_LOGITS_PER_CHUNK_ON_GPU = 2**25


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                          keep_logits_up_to: int = KEEP_LOGITS_UP_TO, scale: float = 1.0,
                          softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sum of cross_entropy(logits, targets), logits = `logit_transform`'s map (`scale`, `softcap`) of head(hidden)."""
    count = torch.tensor(targets.numel(), device=hidden.device)
    if torch.is_grad_enabled() and hidden.requires_grad and _frozen_plain_head(head):
        rows = fused_rows(head.out_features, hidden.device)
        return FrozenHeadCrossEntropy.apply(hidden, head, targets, rows, scale, softcap), count
    if hidden.shape[0] * head.out_features <= keep_logits_up_to:
        return _chunk_loss(head, hidden, targets, scale, softcap), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, chunk_targets = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and chunk.requires_grad:
            total = total + checkpoint(_chunk_loss, head, chunk, chunk_targets, scale, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, chunk, chunk_targets, scale, softcap)
    return total, count


def fused_rows(vocabulary: int, device: torch.device) -> int:
    """Rows of logits FrozenHeadCrossEntropy computes at once on `device`."""
    per_chunk = FUSED_LOGITS_PER_CHUNK if device.type == "cpu" else FUSED_LOGITS_PER_CHUNK_ON_GPU
    return max(1, per_chunk // vocabulary)


def _frozen_plain_head(head: nn.Module) -> bool:
    """A bias-free nn.Linear with no trainable parameter, whose weight is all here (not partitioned by
    ZeRO-3, which would leave an empty placeholder outside the module's own forward)."""
    return (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
            and getattr(head.weight, "ds_numel", None) is None)


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ W^T, targets), W frozen. The gradient for `hidden`,
    (softmax(logits) - onehot(targets)) @ W, is worked out in the forward, chunk by chunk while the
    chunk's logits are at hand; the backward only scales it. Two products per chunk (the forward
    and the input gradient), the least the loss needs; the checkpointed path takes three and
    computes the softmax twice. With the model's own map of the logits (`scale`, `softcap`), the
    gradient for the head's output is (softmax - onehot) times the map's derivative."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, rows: int, scale: float = 1.0,
                softcap: float | None = None) -> torch.Tensor:
        weight = head.weight
        # The head's own forward (through the library speedups routed it to, if any), and the
        # input-gradient product through that library too, as the routed layer's backward would do it.
        product = onednn.product_of(head)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            logits = head(hidden[start:start + rows]).float()
            slope = _transform_in_place(logits, scale, softcap)
            chunk_targets = targets[start:start + rows]
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            # logsumexp as torch computes it (log sum exp(x - max) + max), in place: its exponentials
            # are the softmax's numerators, so the gradient needs no second exp pass, and no
            # chunk-sized tensor is allocated for x - max.
            maxes = logits.amax(dim=-1, keepdim=True)
            exponentials = logits.sub_(maxes).exp_()
            sums = exponentials.sum(dim=-1, keepdim=True)
            total += (sums.log().add_(maxes).squeeze(1) - target_logits).sum()
            if grad is not None:
                probabilities = exponentials.div_(sums)
                probabilities[torch.arange(len(chunk_targets), device=logits.device), chunk_targets] -= 1
                if slope is not None:
                    probabilities.mul_(slope)
                probabilities = probabilities.to(weight.dtype)
                grad[start:start + rows] = (product(probabilities, weight.t(), None) if product
                                            else probabilities @ weight)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def _transform_in_place(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor | float | None:
    """`_transformed` in place (no second chunk-sized tensor for the logits); returns the map's derivative,
    a number or (softcap) a tensor like `logits`, or None where the map is the identity."""
    if scale == 1.0 and softcap is None:
        return None
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is None:
        return scale
    capped = logits.div_(softcap).tanh_()
    slope = capped.square().mul_(-scale).add_(scale)  # d/dz softcap * tanh(scale * z / softcap): scale (1 - tanh^2)
    capped.mul_(softcap)
    return slope


def _transformed(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The model's own map of its head's output (`logit_transform`), in the order its forward applies it."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
                softcap: float | None = None) -> torch.Tensor:
    return F.cross_entropy(_transformed(head(hidden).float(), scale, softcap), targets, reduction="sum")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = attend) -> 0 where attended, the dtype's minimum elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
