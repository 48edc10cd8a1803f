"""Drop-in ``nn.Module`` losses: thin wrappers over :mod:`fastcl.functional`.

Each class's formula and defaults are written once, in the docs/spec.md section its docstring names (the
registry, :mod:`fastcl.registry`, names the same section). Every module takes its temperature at
construction and, optionally, per call (``loss_fn(z1, z2, temperature=tau)``), so a learnable temperature
or a CLIP logit scale that changes every step needs no new module. The options shared by all of them,
each defined once in docs/spec.md:

* ``sub_dim``, ``normalize``: "Notation and conventions" (DirectCLR's prefix, read in place; the
  normalization and its eps).
* ``backend``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` ("Names and owned parameters";
  ``FASTCL_BACKEND`` overrides ``"auto"``).
* ``distributed``: ``"auto"``, ``"local"``, ``"gather"`` or ``"ring"`` ("Distributed modes",
  docs/distributed.md).
* ``reduction`` and each ``forward``'s ``weight``: "Reductions and weights".
* ``check_finite``: "Non-finite input" (off by default: NaN/Inf propagate, as AMP's ``GradScaler`` needs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastcl import functional
from fastcl._validate import Temperature

__all__ = ["NTXentLoss", "InfoNCELoss", "DirectCLRLoss", "SupConLoss", "DCLLoss", "SigLIPLoss", "CLIPLoss"]

MAX_LOGIT_SCALE = 100.0  # open_clip clamps its learnable log t to [0, ln 100] after every step (CLIP's bound)


def _owned_logit_scale(module: nn.Module, initial: float, max_logit_scale: float) -> None:
    """Registers ``module.logit_scale``, a learnable log t as open_clip stores it (docs/spec.md, "Names")."""
    for name, value in (("logit_scale", initial), ("max_logit_scale", max_logit_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name}: expected a finite float > 0 (t itself, not its log), got {value!r}")
    module.logit_scale = nn.Parameter(torch.tensor(math.log(initial)))
    module.max_logit_scale = float(max_logit_scale)


def _clamped_scale(module: nn.Module) -> Tensor:
    """t = exp(logit_scale) after open_clip's in-place clamp of log t to [0, ln max] (open_clip clamps after
    each optimizer step; clamping before each use gives every forward the same value)."""
    with torch.no_grad():
        module.logit_scale.clamp_(0.0, math.log(module.max_logit_scale))
    return module.logit_scale.exp()


def _as_scalar(tau: Temperature) -> Temperature:
    """A one-element ``[1]`` tensor (how ``nn.Parameter(torch.ones([1]))`` scales are often built) as 0-dim."""
    if isinstance(tau, Tensor) and tau.dim() == 1 and tau.numel() == 1:
        return tau.reshape(())
    return tau


class _TemperatureMixin:
    """Stores the construction-time temperature so that it keeps working on every step."""

    def _store_temperature(self, temperature: Temperature) -> None:
        if isinstance(temperature, nn.Parameter):
            self.temperature = temperature  # registered: in parameters(), state_dict() and moved by .to()
            return
        if isinstance(temperature, Tensor):
            if temperature.grad_fn is not None:
                # A tensor computed from a parameter (1 / logit_scale.exp()) is one step's graph: the first
                # backward frees it and every later step would fail deep inside autograd.
                raise ValueError(
                    "temperature: got a tensor computed from other tensors "
                    f"(grad_fn={type(temperature.grad_fn).__name__}); its graph is freed by the first backward. "
                    "Pass it per call instead, loss_fn(a, b, temperature=1 / logit_scale.exp()), "
                    "or give an nn.Parameter"
                )
            self.register_buffer("temperature", temperature, persistent=False)
            return
        self.temperature = temperature

    def _temperature(self, temperature: Optional[Temperature]) -> Temperature:
        return _as_scalar(self.temperature if temperature is None else temperature)

    def _temperature_repr(self) -> str:
        tau = self.temperature
        return f"temperature={tau.detach().tolist() if isinstance(tau, Tensor) else tau}"


class NTXentLoss(_TemperatureMixin, nn.Module):
    """SimCLR's NT-Xent over two views (Chen et al. 2020, https://arxiv.org/abs/2002.05709): docs/spec.md,
    "NT-Xent". With N = 1 the loss is exactly 0 (a trailing batch of one pair does not stop a training loop).

    Args:
        temperature: τ > 0, a float, a 0-dim tensor, or an ``nn.Parameter`` (learned; registered on the
            module). A tensor computed from other tensors is refused (pass it per call instead).
        sub_dim, normalize, backend, distributed, check_finite, reduction: the shared options (module
            docstring).
        beta, tau_plus: hard negatives (docs/spec.md, "Hard negatives"): HCL's concentration β ≥ 0 and the
            debiased estimator's positive-class prior 0 ≤ τ⁺ < 1; None: off (single process).

    Shape:
        z1, z2: ``[N, D]``, same shape, dtype and device. Output: ``[]``.

    Returns:
        The mean loss, 0-dim float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, τ ≤ 0, NaN/Inf inputs with ``check_finite``; the message names the argument.
        TypeError: integer embeddings, a temperature that is not a number or tensor.
        RuntimeError: a backend that cannot run on these tensors.

    Example:
        >>> import torch
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> z1, z2 = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = loss_fn(z1, z2)
        >>> loss.shape
        torch.Size([])
        >>> tau = torch.nn.Parameter(torch.tensor(0.2))     # learned temperature, built once
        >>> loss_fn = NTXentLoss(temperature=tau)
        >>> for _ in range(2):
        ...     loss_fn(z1, z2).backward()
        >>> tau.grad is not None
        True
        >>> bool(loss_fn(z1, z2, temperature=0.1) > 0)       # per-call temperature
        True
    """

    def __init__(
        self,
        temperature: Temperature = 0.5,
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
        check_finite: bool = False,
        reduction: str = "mean",
        beta: Optional[float] = None,
        tau_plus: Optional[float] = None,
    ):
        super().__init__()
        self._store_temperature(temperature)
        self.sub_dim, self.normalize, self.check_finite = sub_dim, normalize, check_finite
        self.backend, self.distributed, self.reduction = backend, distributed, reduction
        self.hard_negatives = {} if beta is None and tau_plus is None else {"beta": beta, "tau_plus": tau_plus}

    _loss = staticmethod(functional.nt_xent)

    def forward(
        self, z1: Tensor, z2: Tensor, temperature: Optional[Temperature] = None, weight: Optional[Tensor] = None
    ) -> Tensor:
        """Args: z1, z2: the two views ``[N, D]``; temperature: this call's τ (``None``: the module's);
        weight: per-anchor weights, ``[N]`` or ``[2, N]``."""
        return self._loss(
            z1,
            z2,
            self._temperature(temperature),
            sub_dim=self.sub_dim,
            normalize=self.normalize,
            backend=self.backend,
            distributed=self.distributed,
            reduction=self.reduction,
            weight=weight,
            check_finite=self.check_finite,
            **self.hard_negatives,
        )

    def extra_repr(self) -> str:
        hard = "".join(f", {k}={v}" for k, v in self.hard_negatives.items())
        return (
            f"{self._temperature_repr()}, sub_dim={self.sub_dim}, normalize={self.normalize}, "
            f"backend={self.backend!r}, distributed={self.distributed!r}, reduction={self.reduction!r}, "
            f"check_finite={self.check_finite}{hard}"
        )


class InfoNCELoss(_TemperatureMixin, nn.Module):
    """Cross-view InfoNCE (van den Oord et al. 2018, https://arxiv.org/abs/1807.03748), the form of
    CLIP and DirectCLR: docs/spec.md, "Cross-view InfoNCE" (with a ``queue``: "InfoNCE with a queue").
    With ``symmetric=False``, k may have more rows than q and ``targets`` (per call) give each query's
    positive key index (Inf-CL's labels).

    For CLIP, τ = 1 / logit_scale: pass ``temperature=1 / model.logit_scale.exp()`` per call (the
    gradient reaches the logit scale), or use :class:`fastcl.compat.open_clip.ClipLoss`.

    Args:
        temperature: τ > 0, a float, a 0-dim tensor or an ``nn.Parameter``.
        symmetric: average both directions (``True``) or return ``ℓ(q, k)`` only.
        batch_negatives: with a ``queue`` (MoCo), also use the batch's other keys as negatives.
        beta, tau_plus: hard-negative estimators (HCL's β, the debiased τ⁺), as :class:`NTXentLoss`.
        sub_dim, normalize, backend, distributed, check_finite, reduction: the shared options (module
            docstring); CLIP models normalize before the loss, so ``normalize=False`` skips redundant work.

    Shape:
        q: ``[N, D]``; k: ``[N, D]`` (``[K, D]``, K ≥ N, with ``symmetric=False``); targets: ``[N]``
        int64. Output: ``[]``.

    Returns:
        The mean loss, 0-dim float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, τ ≤ 0, NaN/Inf inputs with ``check_finite``.
        TypeError: integer embeddings, a non-bool ``symmetric``.
        RuntimeError: a backend that cannot run on these tensors.

    Example:
        >>> import torch
        >>> logit_scale = torch.nn.Parameter(torch.tensor(2.659))   # log(1 / 0.07), as CLIP
        >>> loss_fn = InfoNCELoss(normalize=False)
        >>> img = torch.nn.functional.normalize(torch.randn(8, 32), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(8, 32), dim=1)
        >>> loss = loss_fn(img, txt, temperature=1 / logit_scale.exp())
        >>> loss.backward()
        >>> logit_scale.grad is not None
        True
    """

    def __init__(
        self,
        temperature: Temperature = 0.1,
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        symmetric: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
        check_finite: bool = False,
        reduction: str = "mean",
        batch_negatives: bool = False,
        beta: Optional[float] = None,
        tau_plus: Optional[float] = None,
    ):
        super().__init__()
        self._store_temperature(temperature)
        self.sub_dim, self.normalize, self.symmetric = sub_dim, normalize, symmetric
        self.backend, self.distributed, self.check_finite = backend, distributed, check_finite
        self.reduction, self.batch_negatives = reduction, batch_negatives
        self.hard_negatives = {} if beta is None and tau_plus is None else {"beta": beta, "tau_plus": tau_plus}

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        temperature: Optional[Temperature] = None,
        targets: Optional[Tensor] = None,
        weight: Optional[Tensor] = None,
        queue: Optional[Tensor] = None,
    ) -> Tensor:
        """Args: q, k: queries and keys (e.g. image and text); temperature: this call's τ; targets: the
        index of each query's positive key (``symmetric=False`` only), default ``arange(N)``; weight:
        per-anchor weights, ``[N]`` (or ``[2, N]`` when symmetric); queue: ``[K, D]`` MoCo negatives
        (``symmetric=False``; e.g. :attr:`fastcl.MemoryBank.keys`)."""
        return functional.info_nce(
            q,
            k,
            self._temperature(temperature),
            targets=targets,
            queue=queue,
            batch_negatives=self.batch_negatives,
            **self.hard_negatives,
            sub_dim=self.sub_dim,
            normalize=self.normalize,
            symmetric=self.symmetric,
            backend=self.backend,
            distributed=self.distributed,
            reduction=self.reduction,
            weight=weight,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return (
            f"{self._temperature_repr()}, sub_dim={self.sub_dim}, normalize={self.normalize}, "
            f"symmetric={self.symmetric}, backend={self.backend!r}, distributed={self.distributed!r}, "
            f"reduction={self.reduction!r}, batch_negatives={self.batch_negatives}, check_finite={self.check_finite}"
        )


class DirectCLRLoss(InfoNCELoss):
    """DirectCLR (Jing et al. 2022, https://arxiv.org/abs/2110.09348): symmetric InfoNCE (docs/spec.md,
    "Cross-view InfoNCE") on the first ``sub_dim`` features of the representation, no projector.

    Args:
        sub_dim: length of the prefix d0 (360 in the paper's code).
        temperature: τ > 0 (0.1 in the paper's code).
        backend, distributed, check_finite, reduction: as :class:`InfoNCELoss`.

    Shape:
        r1, r2: ``[N, D]`` representations with D ≥ ``sub_dim``. Output: ``[]``.

    Returns:
        ``(ℓ(z1, z2) + ℓ(z2, z1)) / 2`` with ``z = normalize(r[:, :sub_dim])``.

    Raises:
        ValueError: ``sub_dim`` > D or < 1, and the cases of :class:`InfoNCELoss`.

    Example:
        >>> import torch
        >>> loss = DirectCLRLoss(sub_dim=360)(torch.randn(8, 2048), torch.randn(8, 2048))
        >>> loss.dtype
        torch.float32
    """

    def __init__(
        self,
        sub_dim: int = 360,
        temperature: Temperature = 0.1,
        backend: str = "auto",
        distributed: str = "auto",
        check_finite: bool = False,
        reduction: str = "mean",
    ):
        super().__init__(
            temperature,
            sub_dim=sub_dim,
            normalize=True,
            symmetric=True,
            backend=backend,
            distributed=distributed,
            check_finite=check_finite,
            reduction=reduction,
        )


class SupConLoss(_TemperatureMixin, nn.Module):
    """Supervised contrastive loss L_out (Khosla et al. 2020, https://arxiv.org/abs/2004.11362):
    docs/spec.md, "Supervised contrastive loss" (positives from ``labels`` or ``mask``, the ``base_temperature``
    prefactor, ``positives_missing``). Without labels and mask every sample is its own class (SimCLR
    with V views). For SupContrast's exact signature and conventions (positional
    ``contrast_mode``, unnormalized features, ``[N, 1]`` labels) use
    :class:`fastcl.compat.supcontrast.SupConLoss`.

    Args:
        temperature: τ > 0, a float, a 0-dim tensor or an ``nn.Parameter``.
        base_temperature: τ_b > 0, a float (the loss is scaled by τ/τ_b).
        contrast_mode: ``"all"`` (every row is an anchor) or ``"one"`` (view 0 only).
        sub_dim, normalize, backend, distributed, check_finite, reduction: the shared options (module
            docstring).
        positives_missing: ``"drop"`` (anchors without a positive leave the mean) or ``"zero"``
            (SupContrast's: they count 0).

    Shape:
        features: ``[N, V, D]``; labels: ``[N]`` integer; mask: ``[N, N]`` (bool/integer: nonzero =
        positive; floating: positive weights).
        Output: ``[]``.

    Returns:
        The mean loss over anchors with a positive, 0-dim float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, both ``labels`` and ``mask``, an unknown ``contrast_mode`` or
            ``positives_missing``, τ ≤ 0.
        TypeError: float labels, integer features.

    Example:
        >>> import torch
        >>> feats, labels = torch.randn(8, 2, 32), torch.randint(0, 3, (8,))
        >>> loss = SupConLoss(temperature=0.07)(feats, labels)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: Temperature = 0.07,
        base_temperature: float = 0.07,
        contrast_mode: str = "all",
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
        check_finite: bool = False,
        positives_missing: str = "drop",
        reduction: str = "mean",
    ):
        super().__init__()
        self._store_temperature(temperature)
        self.base_temperature, self.contrast_mode = base_temperature, contrast_mode
        self.sub_dim, self.normalize, self.backend, self.distributed = sub_dim, normalize, backend, distributed
        self.check_finite, self.positives_missing, self.reduction = check_finite, positives_missing, reduction

    def forward(
        self,
        features: Tensor,
        labels: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        temperature: Optional[Temperature] = None,
        weight: Optional[Tensor] = None,
    ) -> Tensor:
        """Args: features ``[N, V, D]``; labels ``[N]`` or mask ``[N, N]`` (or neither); temperature: this
        call's τ; weight: per-anchor weights, ``[N]`` or ``[N, V]``."""
        return functional.supcon(
            features,
            labels,
            mask,
            self._temperature(temperature),
            base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode,
            positives_missing=self.positives_missing,
            sub_dim=self.sub_dim,
            normalize=self.normalize,
            backend=self.backend,
            distributed=self.distributed,
            reduction=self.reduction,
            weight=weight,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return (
            f"{self._temperature_repr()}, base_temperature={self.base_temperature}, "
            f"contrast_mode={self.contrast_mode!r}, sub_dim={self.sub_dim}, normalize={self.normalize}, "
            f"backend={self.backend!r}, distributed={self.distributed!r}, check_finite={self.check_finite}, "
            f"positives_missing={self.positives_missing!r}, reduction={self.reduction!r}"
        )


class DCLLoss(NTXentLoss):
    """Decoupled contrastive loss (Yeh et al. 2022, https://arxiv.org/abs/2110.06848), NT-Xent without
    the positive pair in its denominator, as lightly's ``DCLLoss``: docs/spec.md, "DCL". DCLW's weights:
    :func:`fastcl.functional.dcl`'s ``weight_sigma``.

    Args:
        temperature: τ > 0, a float, a 0-dim tensor or an ``nn.Parameter``.
        sub_dim, normalize, backend, distributed, check_finite, reduction: the shared options (module
            docstring).

    Shape:
        z1, z2: ``[N, D]``, N ≥ 2. Output: ``[]``.

    Returns:
        The mean loss, 0-dim float32 (float64 for float64 inputs).

    Raises:
        ValueError, TypeError: bad input, naming the argument. RuntimeError: a backend that cannot run here.

    Example:
        >>> import torch
        >>> DCLLoss(temperature=0.1)(torch.randn(8, 32), torch.randn(8, 32)).shape
        torch.Size([])
    """

    _loss = staticmethod(functional.dcl)

    def __init__(
        self,
        temperature: Temperature = 0.1,
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
        check_finite: bool = False,
        reduction: str = "mean",
    ):
        super().__init__(temperature, sub_dim, normalize, backend, distributed, check_finite, reduction)


class SigLIPLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, https://arxiv.org/abs/2303.15343), as open_clip's
    ``SigLipLoss``: docs/spec.md, "SigLIP".

    Args:
        logit_scale: t > 0 (already exponentiated): a float, a 0-dim tensor or an ``nn.Parameter``
            (learned; registered on the module). SigLIP initialises t = 10.
        logit_bias: b: a float, a 0-dim tensor or an ``nn.Parameter``. SigLIP initialises −10.
        sub_dim, normalize, backend, distributed, check_finite, reduction: the shared options (module
            docstring).
        learnable: the module owns t and b as parameters, initialised from ``logit_scale`` / ``logit_bias``
            (floats): ``self.logit_scale`` holds log t, as open_clip stores it, clamped like open_clip's to
            t ≤ ``max_logit_scale``; ``self.logit_bias`` holds b.
        max_logit_scale: the clamp of a learnable t (open_clip's 100).

    Shape:
        x, y: ``[N, D]`` paired rows. Output: ``[]``.

    Returns:
        The loss, 0-dim float32 (float64 for float64 inputs).

    Raises:
        ValueError, TypeError: bad input, naming the argument. RuntimeError: a backend that cannot run here.

    Example:
        >>> import torch
        >>> loss_fn = SigLIPLoss(torch.nn.Parameter(torch.tensor(10.0)), torch.nn.Parameter(torch.tensor(-10.0)))
        >>> loss_fn(torch.randn(8, 32), torch.randn(8, 32)).backward()
        >>> loss_fn.logit_scale.grad is not None and loss_fn.logit_bias.grad is not None
        True
        >>> owned = SigLIPLoss(learnable=True)                  # owns log t = log 10 and b = -10
        >>> sorted(name for name, _ in owned.named_parameters())
        ['logit_bias', 'logit_scale']
    """

    def __init__(
        self,
        logit_scale: Temperature = 10.0,
        logit_bias: Temperature = -10.0,
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
        check_finite: bool = False,
        reduction: str = "mean",
        learnable: bool = False,
        max_logit_scale: float = MAX_LOGIT_SCALE,
    ):
        super().__init__()
        self.learnable = learnable
        if learnable:
            if isinstance(logit_bias, bool) or not isinstance(logit_bias, (int, float)):
                raise TypeError(f"logit_bias: expected a float (the initial b) with learnable=True, got {logit_bias!r}")
            _owned_logit_scale(self, logit_scale, max_logit_scale)
            self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)))
        else:
            self.logit_scale, self.logit_bias = logit_scale, logit_bias  # an nn.Parameter registers itself
        self.sub_dim, self.normalize, self.check_finite = sub_dim, normalize, check_finite
        self.backend, self.distributed, self.reduction = backend, distributed, reduction

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        logit_scale: Optional[Temperature] = None,
        logit_bias: Optional[Temperature] = None,
        weight: Optional[Tensor] = None,
    ) -> Tensor:
        """Args: x, y: ``[N, D]``; logit_scale, logit_bias: this call's t and b (``None``: the module's);
        weight: per-anchor (per x row) weights ``[N]``."""
        if logit_scale is None:
            logit_scale = _clamped_scale(self) if self.learnable else self.logit_scale
        return functional.siglip(
            x,
            y,
            logit_scale,
            self.logit_bias if logit_bias is None else logit_bias,
            sub_dim=self.sub_dim,
            normalize=self.normalize,
            backend=self.backend,
            distributed=self.distributed,
            reduction=self.reduction,
            weight=weight,
            check_finite=self.check_finite,
        )


class CLIPLoss(nn.Module):
    """CLIP's symmetric InfoNCE (Radford et al. 2021, https://arxiv.org/abs/2103.00020) owning its learnable
    logit scale: docs/spec.md, "Cross-view InfoNCE" with τ = 1/t (:func:`fastcl.functional.info_nce`).

    ``self.logit_scale`` holds log t as open_clip stores it (initialised to log(1/0.07), as open_clip's
    ``init_logit_scale``); each forward first clamps it in place to [0, ln ``max_logit_scale``], as
    open_clip's training loop does after every optimizer step, so a checkpoint's value loads as is.
    For open_clip's own call forms use :class:`fastcl.compat.open_clip.ClipLoss`.

    Args:
        logit_scale: the initial t (not its log): open_clip's 1/0.07.
        learnable: own t as a parameter (``True``) or keep it fixed.
        max_logit_scale: the clamp of t (open_clip's 100).
        sub_dim, normalize, backend, distributed, check_finite, reduction: the shared options (module
            docstring).

    Shape:
        image_features, text_features: ``[N, D]`` paired rows. Output: ``[]`` (``[2, N]`` for
        ``reduction="none"``: row 0 the images' ℓ, row 1 the texts').

    Returns:
        The loss, 0-dim float32 (float64 for float64 inputs).

    Raises:
        ValueError, TypeError: bad input, naming the argument. RuntimeError: a backend that cannot run here.

    Example:
        >>> import torch
        >>> loss_fn = CLIPLoss()
        >>> round(float(loss_fn.logit_scale.exp()), 4)                 # 1 / 0.07
        14.2857
        >>> loss_fn(torch.randn(8, 32), torch.randn(8, 32)).backward()
        >>> loss_fn.logit_scale.grad is not None
        True
    """

    def __init__(
        self,
        logit_scale: float = 1 / 0.07,
        learnable: bool = True,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
        check_finite: bool = False,
        reduction: str = "mean",
    ):
        super().__init__()
        self.learnable = learnable
        if learnable:
            _owned_logit_scale(self, logit_scale, max_logit_scale)
        else:
            self.logit_scale = logit_scale
        self.sub_dim, self.normalize, self.check_finite = sub_dim, normalize, check_finite
        self.backend, self.distributed, self.reduction = backend, distributed, reduction

    def forward(self, image_features: Tensor, text_features: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """Args: image_features, text_features: ``[N, D]``; weight: per-anchor weights ``[N]`` or ``[2, N]``."""
        scale = _clamped_scale(self) if self.learnable else self.logit_scale
        return functional.info_nce(
            image_features,
            text_features,
            1.0 / scale,
            symmetric=True,
            sub_dim=self.sub_dim,
            normalize=self.normalize,
            backend=self.backend,
            distributed=self.distributed,
            reduction=self.reduction,
            weight=weight,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        scale = float(self.logit_scale.detach().exp()) if self.learnable else self.logit_scale
        return (
            f"t={scale:.4g}, learnable={self.learnable}, sub_dim={self.sub_dim}, normalize={self.normalize}, "
            f"backend={self.backend!r}, distributed={self.distributed!r}, reduction={self.reduction!r}"
        )
