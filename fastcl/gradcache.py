"""Gradient caching: contrastive batches larger than the encoder's memory (Gao et al. 2021).

fastcl's losses are memory-flat in the batch, but the encoder's activations are not. :class:`GradCache`
removes that limit in four steps (https://arxiv.org/abs/2101.06983):

1. encode every input chunk by chunk **without** a graph, recording the RNG state before each chunk;
2. compute the loss once on the full embeddings and backpropagate it to the embeddings (and to the
   loss's own parameters: a learnable temperature, a logit scale);
3. re-encode each chunk **with** a graph, replaying its RNG state (CPU and CUDA), so dropout, stochastic
   depth or in-model augmentation draw what the first pass drew;
4. backpropagate the chunk's slice of the embedding gradient into the encoder, then free its graph.

Peak memory is one chunk's activations plus the embeddings, whatever the batch; the cost is one more
forward. The parameter gradients are those of one ``loss.backward()`` after encoding the batch chunk by
chunk with a graph — for a model without batch statistics or randomness, the full-batch gradient.
Memory model, BatchNorm, DDP and AMP: docs/gradcache.md.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["GradCache", "BATCHNORM_MODES"]

# What to do with BatchNorm layers in train mode (docs/gradcache.md, "BatchNorm").
BATCHNORM_MODES = ("accept", "freeze")

Encoder = Callable[[Tensor], Tensor]


class GradCache:
    """One training step's gradients at any batch size, one chunk of activations at a time.

    ``gc(*inputs, **loss_kwargs)`` encodes ``inputs[i]`` with ``encoders[i]`` (or with the one encoder),
    computes ``loss_fn(*embeddings, **loss_kwargs)``, leaves in every parameter's ``.grad`` what one
    ``loss.backward()`` would (accumulated onto existing gradients, as backward does) and returns the
    loss, detached. The optimizer step stays yours.

    Args:
        encoders: one callable for every input, or a sequence with one per input. ``nn.Module``s are
            inspected for BatchNorm layers and ``DistributedDataParallel`` wrappers (also inside
            ``torch.compile`` or a wrapper module); each must map ``[n, ...]`` to a tensor ``[n, ...]``.
        loss_fn: any callable on the embeddings returning a scalar tensor: a fastcl loss module or
            functional, or a lambda that arranges the embeddings (``torch.stack`` for SupCon's
            ``[N, V, D]``). Its own parameters get their gradients from the one loss backward.
        chunk_size: rows per encoder call (the last chunk of an input may be smaller); > 0.
        scaler: a ``torch.amp.GradScaler`` (or anything with ``.scale(loss)``): the loss is scaled before
            the backward, as ``scaler.scale(loss).backward()``; call ``scaler.step`` afterwards as usual.
        batchnorm: BatchNorm layers in train mode normalize each chunk with that chunk's statistics.
            ``None``: accept that and warn once; ``"accept"``: the same, silently (running statistics are
            updated once per chunk, not twice); ``"freeze"``: run them in eval mode during the call
            (running statistics, no update; restored afterwards). No mode reproduces full-batch
            statistics: docs/gradcache.md says why.
        progress: ``progress(done, total)`` after each re-encoded chunk (e.g. to update a progress bar).

    Shape:
        inputs[i]: ``[N_i, ...]``, chunked along dim 0; the inputs may have different N_i.
        Returns: the loss, as ``loss_fn`` returns it (a scalar), detached.

    Raises:
        ValueError / TypeError naming the argument, before any gradient reaches a parameter: a
        ``chunk_size`` that is not a positive int, a count of encoders that is not 1 or ``len(inputs)``,
        an input that is not a tensor with rows, an encoder output that is not a tensor with one row per
        input row, a ``loss_fn`` that rejects the embeddings (its own error, with the shapes it got), does
        not return a scalar tensor, or does not depend on one of the embeddings.

    Under DDP the loss gathers the other ranks' embeddings itself (``distributed="gather"`` or ``"ring"``);
    every chunk but the last of each ``DistributedDataParallel`` encoder runs under ``no_sync()``, so the
    gradients are all-reduced once per step.

    Examples:
        >>> import torch, fastcl
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> encoder = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Dropout(0.1), torch.nn.Linear(32, 16))
        >>> tau = torch.nn.Parameter(torch.tensor(0.5))               # a learnable temperature
        >>> gc = fastcl.GradCache(encoder, fastcl.NTXentLoss(temperature=tau), chunk_size=4)
        >>> x1, x2 = torch.randn(10, 10), torch.randn(10, 10)          # two views: chunks of 4, 4, 2 rows
        >>> loss = gc(x1, x2)
        >>> loss.requires_grad, encoder[0].weight.grad.shape, tau.grad is not None
        (False, torch.Size([32, 10]), True)

        SupCon with labels, CLIP-style towers with a loss that arranges the embeddings:

        >>> supcon = fastcl.SupConLoss(temperature=0.1)
        >>> gc = fastcl.GradCache(encoder, lambda z1, z2, labels: supcon(torch.stack([z1, z2], 1), labels), 4)
        >>> loss = gc(x1, x2, labels=torch.randint(0, 3, (10,)))
        >>> text_tower = torch.nn.Linear(5, 16)
        >>> gc = fastcl.GradCache([encoder, text_tower], fastcl.InfoNCELoss(temperature=0.07), chunk_size=4)
        >>> loss = gc(x1, torch.randn(10, 5))
    """

    def __init__(
        self,
        encoders: Union[Encoder, Sequence[Encoder]],
        loss_fn: Callable[..., Tensor],
        chunk_size: int,
        *,
        scaler=None,
        batchnorm: Optional[str] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size: expected a positive int, got {type(chunk_size).__name__} {chunk_size!r}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
        if batchnorm is not None and batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm: expected None or one of {list(BATCHNORM_MODES)}, got {batchnorm!r}")
        # A list, tuple or ModuleList holds one encoder per input; anything else (nn.Sequential included) is one.
        several = isinstance(encoders, (list, tuple, nn.ModuleList))
        self.encoders = tuple(encoders) if several else (encoders,)
        for i, encoder in enumerate(self.encoders):
            if not callable(encoder):
                raise TypeError(f"encoders[{i}]: expected a callable (an nn.Module), got {type(encoder).__name__}")
        if not self.encoders:
            raise ValueError("encoders: expected one encoder or a non-empty sequence, got an empty sequence")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.loss_fn, self.chunk_size, self.scaler = loss_fn, chunk_size, scaler
        self.batchnorm, self.progress = batchnorm, progress
        self._warned = False

    def __call__(self, *inputs: Tensor, **loss_kwargs) -> Tensor:
        encoders = self._encoders_for(inputs)
        # (input, chunk number, rows) in encoding order
        tasks = [(i, k, chunk) for i, x in enumerate(inputs) for k, chunk in enumerate(x.split(self.chunk_size))]
        batchnorms = self._batchnorms(encoders)
        rng_devices = _cuda_devices(inputs, encoders)
        with _batchnorm_mode(batchnorms, self.batchnorm):
            embeddings, rng_states = self._encode_without_graph(encoders, tasks, batchnorms, rng_devices)
            leaves = [e.detach().requires_grad_() for e in embeddings]
            loss = self._loss(leaves, loss_kwargs)
            # Everything is checked: from here on gradients land. The loss backward fills the embeddings'
            # gradients and accumulates into the loss's own parameters, exactly as the full backward would.
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            # A frozen tower, or an embedding whose gradient is None (the loss reached it through no
            # differentiable path), gives its encoder nothing to backpropagate: not re-encoded.
            trainable = [
                _trainable(encoder, x.requires_grad) and leaf.grad is not None
                for encoder, x, leaf in zip(encoders, inputs, leaves)
            ]
            todo = [t for t, (i, _, _) in enumerate(tasks) if trainable[i]]
            self._encode_with_graph(encoders, tasks, todo, [leaf.grad for leaf in leaves], rng_states, rng_devices)
        return loss.detach()

    # ------------------------------------------------------------------ the passes

    def _encode_without_graph(self, encoders, tasks, batchnorms, rng_devices):
        outputs, rng_states = [[] for _ in encoders], []
        # Running statistics are updated by the re-encode (once per chunk), not here.
        saved_buffers = [(b, b.clone()) for m in batchnorms for b in m.buffers()]
        try:
            with torch.no_grad():
                for i, _, chunk in tasks:
                    rng_states.append(_rng_state(rng_devices))
                    out = encoders[i](chunk)
                    _check_output(out, chunk, self._encoder_name(i), outputs[i])
                    outputs[i].append(out)
        finally:
            with torch.no_grad():
                for buffer, saved in saved_buffers:
                    buffer.copy_(saved)
        return [torch.cat(chunks) if len(chunks) > 1 else chunks[0] for chunks in outputs], rng_states

    def _loss(self, leaves: list[Tensor], loss_kwargs: dict) -> Tensor:
        try:
            loss = self.loss_fn(*leaves, **loss_kwargs)
        except (ValueError, TypeError) as error:
            shapes = ", ".join(str(tuple(leaf.shape)) for leaf in leaves)
            raise type(error)(f"loss_fn: rejected the embeddings of shapes {shapes}: {error}") from error
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn: expected it to return a scalar tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn: expected a scalar loss, got shape {tuple(loss.shape)}")
        reached = _reached_leaves(loss)
        for i, leaf in enumerate(leaves):
            if not any(t is leaf for t in reached):
                raise ValueError(
                    f"loss_fn: the loss does not depend on the embedding of inputs[{i}] (shape {tuple(leaf.shape)}); "
                    "every input must reach the loss (a detached or unused embedding gives its encoder no gradient)"
                )
        return loss

    def _encode_with_graph(self, encoders, tasks, todo, grads, rng_states, rng_devices) -> None:
        last_use = {}  # each DDP wrapper all-reduces on its encoder's last chunk only
        for t in todo:
            for ddp in _ddp_modules(encoders[tasks[t][0]]):
                last_use[ddp] = t
        grad_chunks = [None if g is None else g.split(self.chunk_size) for g in grads]
        # fork_rng restores the state after the first pass on exit: the replays leave no trace.
        with torch.random.fork_rng(devices=rng_devices):
            for done, t in enumerate(todo, 1):
                i, k, chunk = tasks[t]
                _set_rng_state(rng_states[t], rng_devices)
                with contextlib.ExitStack() as stack:
                    for ddp in _ddp_modules(encoders[i]):
                        if last_use[ddp] != t:
                            stack.enter_context(ddp.no_sync())
                    out = encoders[i](chunk)
                    if out.requires_grad:
                        out.backward(grad_chunks[i][k])
                del out
                if self.progress is not None:
                    self.progress(done, len(todo))

    # ------------------------------------------------------------------ checks

    def _encoders_for(self, inputs) -> list[Encoder]:
        if not inputs:
            raise ValueError("inputs: expected at least one input tensor, got none")
        for i, x in enumerate(inputs):
            if not isinstance(x, Tensor):
                raise TypeError(f"inputs[{i}]: expected a torch.Tensor, got {type(x).__name__}")
            if x.dim() == 0 or x.shape[0] == 0:
                raise ValueError(f"inputs[{i}]: expected a tensor with at least one row, got shape {tuple(x.shape)}")
        if len(self.encoders) == 1:
            return list(self.encoders) * len(inputs)
        if len(self.encoders) != len(inputs):
            raise ValueError(
                f"encoders: got {len(self.encoders)} encoders for {len(inputs)} inputs (expected 1 or {len(inputs)})"
            )
        return list(self.encoders)

    def _encoder_name(self, i: int) -> str:
        return "encoders" if len(self.encoders) == 1 else f"encoders[{i}]"

    def _batchnorms(self, encoders) -> list[_BatchNorm]:
        found = {}
        for encoder in encoders:
            if isinstance(encoder, nn.Module):
                found.update({id(m): m for m in encoder.modules() if isinstance(m, _BatchNorm) and m.training})
        if found and self.batchnorm is None and not self._warned:
            self._warned = True
            warnings.warn(
                f"GradCache: {len(found)} BatchNorm layer(s) in train mode normalize each chunk of "
                f"{self.chunk_size} rows with that chunk's statistics, not the full batch's; pass "
                "batchnorm='accept' to keep that (and silence this warning) or 'freeze' to use the running "
                "statistics (docs/gradcache.md, 'BatchNorm')",
                stacklevel=3,
            )
        return list(found.values())


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _batchnorm_mode(batchnorms: list[_BatchNorm], mode: Optional[str]):
    if mode != "freeze":
        yield
        return
    for m in batchnorms:
        m.eval()
    try:
        yield
    finally:
        for m in batchnorms:
            m.train()


def _check_output(out, chunk: Tensor, name: str, previous: list[Tensor]) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"{name}: expected the encoder to return a tensor, got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != chunk.shape[0]:
        raise ValueError(
            f"{name}: expected one output row per input row ({chunk.shape[0]} for a chunk of shape "
            f"{tuple(chunk.shape)}), got shape {tuple(out.shape)}"
        )
    if previous and (out.shape[1:] != previous[0].shape[1:] or out.dtype != previous[0].dtype):
        raise ValueError(
            f"{name}: chunks of one input gave different output layouts: {tuple(previous[0].shape)} "
            f"{previous[0].dtype}, then {tuple(out.shape)} {out.dtype}"
        )


def _reached_leaves(loss: Tensor) -> list[Tensor]:
    """The leaf tensors the loss's autograd graph accumulates gradients into."""
    leaves, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it writes
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _trainable(encoder, input_requires_grad: bool) -> bool:
    """False only for a module without trainable parameters on inputs without gradients (a frozen
    tower): its re-encode would produce no gradient, so it is skipped."""
    if input_requires_grad or not isinstance(encoder, nn.Module):
        return True
    return any(p.requires_grad for p in encoder.parameters())


def _ddp_modules(encoder) -> list[DistributedDataParallel]:
    if not isinstance(encoder, nn.Module):
        return []
    return [m for m in encoder.modules() if isinstance(m, DistributedDataParallel)]


def _cuda_devices(inputs, encoders) -> list[int]:
    """CUDA devices whose RNG a chunk may draw from: the inputs' and the encoders' parameters'."""
    devices = {x.device for x in inputs}
    for encoder in encoders:
        if isinstance(encoder, nn.Module):
            devices.update(p.device for p in encoder.parameters())
    return sorted(
        {d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"}
    )


def _rng_state(cuda_devices: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices]


def _set_rng_state(state: tuple, cuda_devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, device_state in zip(cuda_devices, cuda):
        torch.cuda.set_rng_state(device_state, device)
