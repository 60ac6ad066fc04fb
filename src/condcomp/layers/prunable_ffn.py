"""A feed-forward layer whose hidden channels can be switched off per sequence, and gathered into a
compact dense FFN once the choice is fixed (input-conditioned pruning; static pruning).

``PrunableFeedForward`` has the parameters of ``FeedForward`` under the same names, so a dense
model's (or a pretrained decoder's) weights load unchanged. Training multiplies the hidden
activations by a channel mask (soft weights in [0, 1], or a sampled L0 gate); inference never
multiplies by a mask: ``compact(mask)`` returns a plain ``FeedForward`` holding only the kept rows of
``up`` (gate and up rows for SwiGLU) and columns of ``down``, which the model then runs for the
prompt and every generated token.
"""

from __future__ import annotations

import torch

from condcomp.layers.feedforward import FeedForward
from condcomp.layers.info import LayerInfo
from condcomp.routing.channel_mask import (ChannelMaskPredictor, HardConcreteGates, at_least_one, hard_channel_mask,
                                           kept_channels, magnitude_scores)
from condcomp.routing.soft_top_k import soft_top_k
from condcomp.routing.types import RoutingError


class PrunableFeedForward(FeedForward):
    """x: [b, t, d_model] -> (y, LayerInfo()). ``channel_mask``: None (dense), or [b, d_ff] (one mask
    per sequence) or [d_ff] (one for all), float weights or bool, multiplying the hidden channels."""

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                channel_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerInfo]:
        if channel_mask is None:
            return super().forward(x, padding_mask)
        h = self.hidden(x)
        m = channel_mask.to(h.dtype)
        h = h * (m[:, None, :] if m.dim() == 2 else m)
        return self.dropout(self.down(h)), LayerInfo()

    @property
    def d_ff(self) -> int:
        return self.down.in_features

    @torch.no_grad()
    def compact(self, keep: torch.Tensor, *, where: str = "a layer") -> FeedForward:
        """A dense FFN of only the kept channels (keep: bool [d_ff]; one kept at least, with a
        warning). Its output equals ``forward(x, channel_mask=keep)`` up to float rounding order."""
        keep = at_least_one(keep.bool().reshape(1, -1), where=where)[0]
        idx = keep.nonzero().squeeze(-1)
        d_model = self.up.in_features
        small = FeedForward(d_model=d_model, d_ff=int(idx.numel()), activation=self.activation)
        small = small.to(device=self.up.weight.device, dtype=self.up.weight.dtype)
        up, down = self.channel_weights(idx)
        small.up.weight.copy_(up)
        small.down.weight.copy_(down)
        return small.eval()


class _ScheduledPruning(PrunableFeedForward):
    """Shared parts of the three pruning methods: a target sparsity reached over the first ``ramp``
    share of training (the trainer calls ``set_progress`` each step; 0 = start, 1 = end), then kept.
    Eval and inference always use the target, and so does training that never calls
    ``set_progress`` (progress starts at 1).

    Subclasses define ``channel_mask_now(x, padding_mask) -> (mask, LayerInfo)``: the mask of this
    forward pass ([d_ff] or [b, d_ff], bool or float weights) at ``current_keep()`` channels."""

    def __init__(self, *, d_model: int, d_ff: int, activation: str, sparsity: float, ramp: float, dropout: float = 0.0):
        super().__init__(d_model=d_model, d_ff=d_ff, activation=activation, dropout=dropout)
        if not 0.0 < sparsity < 1.0:
            raise RoutingError(f"sparsity must be in (0, 1) (the share of FFN channels pruned), got {sparsity}")
        if not 0.0 <= ramp <= 1.0:
            raise RoutingError(f"ramp must be in [0, 1] (the share of training that ramps the sparsity up), got {ramp}")
        self.sparsity, self.ramp = sparsity, ramp
        # A buffer, so a checkpoint taken mid-ramp resumes at the same sparsity.
        self.register_buffer("progress", torch.ones(()))

    @property
    def added_parameters(self) -> tuple[str, ...]:
        """Everything but the dense FFN's weights (predictor, gates, schedule state): a dense model's
        weights leave these as initialised (see ``condcomp.layers.traits``)."""
        return tuple(k for k in self.state_dict(keep_vars=True) if not k.startswith(("up.", "down.")))

    def set_progress(self, fraction: float) -> None:
        self.progress.fill_(min(1.0, max(0.0, fraction)))

    def current_sparsity(self) -> float:
        """The sparsity of this step: the target in eval, ramped linearly in training."""
        if not self.training or self.ramp == 0.0:
            return self.sparsity
        return self.sparsity * min(1.0, float(self.progress) / self.ramp)

    def current_keep(self) -> int:
        return kept_channels(self.d_ff, self.current_sparsity())

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerInfo]:
        mask, info = self.channel_mask_now(x, padding_mask)
        y, _ = super().forward(x, padding_mask, channel_mask=mask)
        info.metrics["kept_share"] = float(self.current_keep()) / self.d_ff
        return y, info


class MagnitudePrunedFeedForward(_ScheduledPruning):
    """Static pruning by weight magnitude (|up rows| x |down column|), the trivial baseline. The
    channel order is read once from the weights the layer holds when it is first run or calibrated
    (after pretrained or seed weights load) and stored, so fine-tuning does not move the mask."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("scores", torch.zeros(self.d_ff))
        self.register_buffer("scored", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Score the channels from the current weights (x is not read)."""
        self.scores.copy_(magnitude_scores(self.up.weight.float(), self.down.weight.float(), self.activation))
        self.scored.fill_(True)
        return self.scores

    def static_mask(self) -> torch.Tensor:
        """bool [d_ff]: the channels kept at the target sparsity."""
        if not bool(self.scored):
            self.calibrate()
        return hard_channel_mask(self.scores, kept_channels(self.d_ff, self.sparsity))

    def channel_mask_now(self, x, padding_mask):
        if not bool(self.scored):
            self.calibrate()
        return hard_channel_mask(self.scores, self.current_keep()), LayerInfo()


class L0PrunedFeedForward(_ScheduledPruning):
    """Static structured pruning with hard-concrete L0 gates (CoFi): training multiplies the channels
    by a sampled gate and adds the Lagrangian ``l0_lagrangian`` that pulls the expected sparsity to
    the (ramped) target; eval keeps the top channels by gate logit, exactly the target count.

    The Lagrange multipliers are maximised: each training step moves them by dual ascent,
    lambda1 += lr * gap, lambda2 += lr * gap^2 (gap = expected - target sparsity), which is what
    CoFi's flipped-gradient optimiser step does, kept out of the model's optimiser so that it is
    neither clipped with the model's gradients nor decayed. They are buffers: checkpoints keep them.
    """

    aux_loss_names = ("l0_lagrangian",)

    def __init__(self, *, lagrangian_lr: float = 0.01, gate_lr_scale: float = 1.0, gate_init: str = "uniform",
                 **kwargs):
        super().__init__(**kwargs)
        if gate_init not in ("uniform", "magnitude"):
            raise RoutingError(f"gate_init must be uniform or magnitude, got {gate_init!r}")
        self.gate_init = gate_init
        self.gates = HardConcreteGates(self.d_ff)
        # The optimiser trains the gate logits at lr * gate_lr_scale (CoFi gives them their own rate).
        self.gates.log_alpha.lr_scale = gate_lr_scale
        self.lagrangian_lr = lagrangian_lr
        self.register_buffer("lambdas", torch.zeros(2))

    def static_mask(self) -> torch.Tensor:
        return self.gates.deterministic_mask(self.sparsity)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """gate_init magnitude: once the dense weights are loaded, shift each gate logit by its
        channel's standardised magnitude score, so the gates start ranked as magnitude pruning
        ranks the channels (CoFi starts them equal: gate_init uniform, which leaves them alone)."""
        if self.gate_init != "magnitude":
            return None
        scores = magnitude_scores(self.up.weight.float(), self.down.weight.float(), self.activation)
        z = (scores - scores.mean()) / scores.std().clamp_min(1e-12)
        self.gates.log_alpha.add_(z.to(self.gates.log_alpha.dtype))
        return self.gates.log_alpha

    def channel_mask_now(self, x, padding_mask):
        if not self.training:
            return self.static_mask(), LayerInfo()
        target = self.current_sparsity()
        lambda1, lambda2 = self.lambdas.clone()  # this step's values; the buffer is updated below
        lagrangian = self.gates.lagrangian(target, lambda1, lambda2)
        expected = 1.0 - float(self.gates.expected_kept().detach().mean())
        with torch.no_grad():
            gap = expected - target
            self.lambdas += self.lagrangian_lr * torch.tensor([gap, gap * gap])
        gates = self.gates.sample()
        info = LayerInfo(aux_losses={"l0_lagrangian": lagrangian},
                         metrics={"expected_sparsity": expected, "closed_share": float((gates == 0).float().mean())})
        return gates, info


class PromptPrunedFeedForward(_ScheduledPruning):
    """Input-conditioned pruning (Hou et al., 2025), one layer's part: a ``ChannelMaskPredictor``
    reads this layer's input mean-pooled over the prompt (the first ``prompt_len`` positions of each
    sequence) and scores the channels; the top channels at the (ramped) sparsity are kept for every
    position of that sequence.

    Training runs the hard mask forward and the ``soft_top_k`` weights' gradient backward (straight
    through), so training and inference use the same masks while the predictor still learns.

    Positions before ``prompt_len - 1`` use a mask that read later prompt tokens: their outputs are
    not causal, and the trainer leaves them out of the loss (``reads_prompt``). From position
    ``prompt_len - 1`` on, every output depends on earlier tokens only, as a decoder needs.
    Decoding token by token goes through ``condcomp.convert.prune.compact_for_prompt`` (the mask is
    fixed once per prompt), so this layer refuses inputs shorter than its prompt.
    """

    def __init__(self, *, prompt_len: int, predictor_hidden: int = 64, predictor_lr_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        d_model = self.up.in_features
        self.prompt_len = prompt_len
        self.predictor = ChannelMaskPredictor(d_model=d_model, d_ff=self.d_ff, n_layers=1, hidden=predictor_hidden,
                                              min_prompt=prompt_len)
        if predictor_lr_scale != 1.0:  # the optimiser gives these their own rate (build_optimizer)
            for p in self.predictor.parameters():
                p.lr_scale = predictor_lr_scale

    @property
    def reads_prompt(self) -> int:
        return self.prompt_len

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start from the magnitude choice: the predictor's output bias becomes the standardised
        magnitude scores of the weights just loaded, so before it learns anything every prompt gets
        the magnitude baseline's channels (its input-dependent part starts small)."""
        scores = magnitude_scores(self.up.weight.float(), self.down.weight.float(), self.activation)
        bias = self.predictor.net[-1].bias
        bias.copy_(((scores - scores.mean()) / scores.std().clamp_min(1e-12)).to(bias.dtype))
        return bias

    def scores(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Channel scores [b, d_ff] from the prompt part of x [b, t, d] (t >= prompt_len)."""
        if x.shape[1] < self.prompt_len:
            raise RoutingError(
                f"the input has {x.shape[1]} positions but this input-conditioned FFN reads a {self.prompt_len}-token "
                "prompt; give at least that many tokens (to decode, compact the model for the prompt first: "
                "condcomp.convert.prune.compact_for_prompt)")
        prompt_mask = None if padding_mask is None else padding_mask[:, : self.prompt_len]
        return self.predictor(x[:, : self.prompt_len], prompt_mask)[:, 0]

    def prompt_mask(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """bool [b, d_ff]: the channels kept for each sequence's prompt at the target sparsity."""
        return hard_channel_mask(self.scores(x, padding_mask).float(), kept_channels(self.d_ff, self.sparsity))

    def channel_mask_now(self, x, padding_mask):
        scores = self.scores(x, padding_mask).float()
        keep = self.current_keep()
        hard = hard_channel_mask(scores, keep)
        if not self.training:
            return hard, LayerInfo()
        soft = soft_top_k(scores, keep) if keep < self.d_ff else torch.ones_like(scores)
        return hard.to(soft.dtype) + (soft - soft.detach()), LayerInfo()  # exactly the hard mask forward
