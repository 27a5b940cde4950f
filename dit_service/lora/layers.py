"""Per-row LoRA deltas inside one decoder batch.

:func:`install_lora_layers` swaps every ``nn.Linear`` of the decoder for a :class:`LoraLinear`
that shares the same weight and bias (the state-dict keys and the base math are unchanged), once
at model load. A :class:`LoraRouter` holds the adapter assignment of the forward in progress:
the pipeline sets it for the duration of one batch with :meth:`LoraRouter.use`, so the model code
knows nothing about adapters.

Each row of a batch carries a blend, ``((adapter, scale), ...)``; a row without adapters has an
empty blend. For every adapted layer, :class:`BatchAdapters` stacks the factors of the batch's
distinct adapters (ranks zero-padded to the largest, which leaves the product exact) and lists
one ``(row, adapter, scale * scaling)`` pair per row and blend entry. A forward then costs, per
adapted layer, a gather of the pairs' input rows and factors, two batched matmuls and one
``index_add_`` into the base output, whatever the number of adapters; rows without adapters
take no part in it. Base weights are never modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_service.lora.format import LinearShapes, LoraAdapter
from shared.errors import Internal

Blend = tuple[tuple[LoraAdapter, float], ...]
"""One row's adapters with their scales (empty: no adapter)."""


class LoraLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same keys) plus the active batch's deltas for this layer."""

    def __init__(self, base: nn.Linear, name: str, router: LoraRouter) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora_name = name
        self.lora_router = router  # a plain object: not a submodule, not in the state dict

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        adapters = self.lora_router.active
        return out if adapters is None else adapters.apply(self.lora_name, x, out)


class LoraRouter:
    """The adapters of the forward in progress (None: plain decoder) and the layers they may target."""

    def __init__(self, targets: LinearShapes) -> None:
        self.targets = targets
        self.active: Optional[BatchAdapters] = None

    @contextlib.contextmanager
    def use(self, adapters: Optional[BatchAdapters]) -> Iterator[None]:
        """Apply ``adapters`` to every decoder call inside the block (restores the previous ones after)."""
        previous, self.active = self.active, adapters
        try:
            yield
        finally:
            self.active = previous


def install_lora_layers(decoder: nn.Module) -> LoraRouter:
    """Wrap every ``nn.Linear`` of ``decoder`` once; a decoder already wrapped keeps its router."""
    for module in decoder.modules():
        if isinstance(module, LoraLinear):
            return module.lora_router
    linears = [(name, module) for name, module in decoder.named_modules() if type(module) is nn.Linear]
    router = LoraRouter({name: (module.out_features, module.in_features) for name, module in linears})
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        parent = decoder.get_submodule(parent_name) if parent_name else decoder
        setattr(parent, child, LoraLinear(module, name, router))
    return router


class _LayerGroup:
    """One decoder layer's share of a batch: stacked factors and the (row, adapter, factor) pairs."""

    def __init__(self, a_t: Tensor, b_t: Tensor, pairs: list[tuple[int, int, float]]) -> None:
        self.a_t = a_t        # [K, in, r_max]
        self.b_t = b_t        # [K, r_max, out]
        self.pairs = pairs    # (item, adapter index, scale * scaling)
        self._indices: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor, bool]] = {}

    def select(self, items: Sequence[int]) -> _LayerGroup:
        position = {item: index for index, item in enumerate(items)}
        kept = [(position[item], k, factor) for item, k, factor in self.pairs if item in position]
        return _LayerGroup(self.a_t, self.b_t, kept)

    def indices(self, num_rows: int, num_items: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        """Row, adapter and factor tensors for a call on ``num_rows`` rows (CFG copies the items)."""
        key = (num_rows, num_items)
        if key not in self._indices:
            if num_rows % num_items:
                raise Internal(f"a decoder call on {num_rows} rows does not fit a batch of {num_items} items")
            copies = num_rows // num_items
            pairs = [(c * num_items + item, k, f) for c in range(copies) for item, k, f in self.pairs]
            rows = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=x.device)
            adapters = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=x.device)
            factors = torch.tensor([p[2] for p in pairs], dtype=x.dtype, device=x.device)
            every_row_once = [p[0] for p in pairs] == list(range(num_rows))
            self._indices[key] = (rows, adapters, factors, every_row_once)
        return self._indices[key]

    def apply(self, x: Tensor, out: Tensor, num_items: int) -> Tensor:
        """``out [N, ..., out] += factor * x @ a_t @ b_t`` for every pair's row (in place)."""
        if not self.pairs:
            return out
        rows, adapters, factors, every_row_once = self.indices(x.shape[0], num_items, x)
        flat_x = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, in]
        picked = flat_x if every_row_once else flat_x.index_select(0, rows)  # [P, L, in]
        if self.a_t.shape[0] == 1:  # one adapter: no weight gather
            hidden = torch.matmul(picked, self.a_t[0])  # [P, L, r]
            hidden = hidden * factors.view(-1, 1, 1)
            delta = torch.matmul(hidden, self.b_t[0])  # [P, L, out]
        else:
            hidden = torch.bmm(picked, self.a_t.index_select(0, adapters))  # [P, L, r_max]
            hidden = hidden * factors.view(-1, 1, 1)
            delta = torch.bmm(hidden, self.b_t.index_select(0, adapters))  # [P, L, out]
        flat_out = out.view(out.shape[0], -1, out.shape[-1])  # [N, L, out], a view of ``out``
        if every_row_once:
            flat_out.add_(delta)
        else:
            flat_out.index_add_(0, rows, delta.to(out.dtype))
        return out


class BatchAdapters:
    """Per-row blends of one batch, arranged per adapted layer (see the module docstring)."""

    def __init__(self, num_items: int, groups: dict[str, _LayerGroup]) -> None:
        self.num_items = num_items
        self._groups = groups

    @classmethod
    def build(cls, blends: Sequence[Blend]) -> Optional[BatchAdapters]:
        """``blends[i]`` is row ``i``'s; None when no row has an adapter with a non-zero scale."""
        blends = [tuple((adapter, float(scale)) for adapter, scale in blend if scale != 0) for blend in blends]
        if not any(blends):
            return None
        order: dict[int, LoraAdapter] = {}
        for blend in blends:
            for adapter, _ in blend:
                order.setdefault(id(adapter), adapter)
        names = sorted({name for adapter in order.values() for name in adapter.modules})
        groups = {name: _group(name, list(order.values()), blends) for name in names}
        return cls(len(blends), groups)

    def select(self, items: Sequence[int]) -> BatchAdapters:
        """The same blends for the batch reduced to ``items`` (live rows, in order)."""
        return BatchAdapters(len(items), {name: group.select(items) for name, group in self._groups.items()})

    def apply(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        group = self._groups.get(name)
        return out if group is None else group.apply(x, out, self.num_items)


def _group(name: str, adapters: list[LoraAdapter], blends: Sequence[Blend]) -> _LayerGroup:
    """Stack the factors of the adapters that adapt layer ``name``; one pair per row and blend entry."""
    present = [adapter for adapter in adapters if name in adapter.modules]
    index = {id(adapter): k for k, adapter in enumerate(present)}
    modules = [adapter.modules[name] for adapter in present]
    max_rank = max(module.rank for module in modules)
    if len(modules) == 1:
        a_t, b_t = modules[0].a_t[None], modules[0].b_t[None]  # [1, in, r], [1, r, out]: views, no copy
    else:
        a_t = torch.stack([F.pad(m.a_t, (0, max_rank - m.rank)) for m in modules])  # [K, in, r_max]
        b_t = torch.stack([F.pad(m.b_t, (0, 0, 0, max_rank - m.rank)) for m in modules])  # [K, r_max, out]
    pairs = [(item, index[id(adapter)], scale * adapter.modules[name].scaling)
             for item, blend in enumerate(blends) for adapter, scale in blend if id(adapter) in index]
    return _LayerGroup(a_t, b_t, pairs)
