"""One way of putting an update onto a module: merged into its weight, or added by a hook.

Merged (switching adapters, evaluating one adapter): ``MergedWeights`` writes
``W = W0 + sum_t w_t * dW_t`` into the live weights, always from a pristine copy ``W0``, so
switching never drifts (A -> B -> A gives the bits of applying A once) and ``restore()`` puts
W0 back by construction. Layers of one weight shape, device and dtype form a group whose weights
are re-homed into one stacked tensor (the modules' parameters become views of it, as FSDP's flat
parameters are), so a switch is one batched kernel per group and term
(``torch.baddbmm(W0, up, down, alpha=w, out=W)``), not one per layer. Before a write goes live
the written groups are checked finite (peft's ``safe_merge``): proven from bounds kept with W0 and
with each prepared term where they suffice, else by an exact pass; a non-finite merge is undone.

Hooked (per-image batches, training, a multi-LoRA zoo): ``UpdateHooks`` adds ``chain(x)`` to a
layer's output, where a chain is a sequence of matrices applied in turn (``(down, up)`` for a
LoRA, ``(V, core, U)`` for a shared basis, ``(dW,)`` for a dense update). A 2-D matrix applies to
every row of the batch; a 3-D one (n, o, i) gives row b its entry ``b % n`` (classifier-free
guidance runs ``[uncond; cond]``, so rows i and n + i are image i), as one batched matmul.
With ``inference=True`` the last step is fused into the output (GEMM epilogue, no extra add).
``Attachment`` is the trainer's form: hooks for factor families, a weight parametrization for
delta-only ones, adapter math in fp32 outside autocast, autograd through the adapter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from studio.adapters.base import capabilities
from studio.errors import ConfigError, KeyMismatchError

Chain = Sequence[Tensor]
MergeFrom = Literal["auto", "dense", "factors"]


# ---------------------------------------------------------------------------------- merged


@dataclass(eq=False)
class FactorTerm:
    """One adapter's low-rank update of every row of a group: ``dW_b = up[b] @ down[b]``.

    Rows the adapter does not target hold zeros (exact: ``W0 + 0 == W0``); ranks are zero-padded.
    """

    down: Tensor  # (n, R, in_flat)
    up: Tensor  # (n, out, R)
    bound: float = float("inf")  # >= max |up @ down| over every entry (see MergedWeights.write)

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()

    def apply(self, live: Tensor, base: Tensor | None, weight: float) -> None:
        """``live = base + weight * up @ down`` (base None: add to live)."""
        if base is None:
            live.baddbmm_(self.up, self.down, alpha=weight)
        else:
            torch.baddbmm(base, self.up, self.down, alpha=weight, out=live)


@dataclass(eq=False)
class DenseTerm:
    """One adapter's dense dW of some rows of a group (``rows`` None: every row, in order)."""

    dense: Tensor  # (m, out, in_flat)
    rows: Tensor | None = None  # (m,) int64 on the group's device
    bound: float = float("inf")  # max |dense|

    @property
    def nbytes(self) -> int:
        return self.dense.numel() * self.dense.element_size()

    def apply(self, live: Tensor, base: Tensor | None, weight: float) -> None:
        if self.rows is None:
            if base is None:
                live.add_(self.dense, alpha=weight)
            else:
                torch.add(base, self.dense, alpha=weight, out=live)
            return
        if base is not None:
            live.copy_(base)
        live.index_add_(0, self.rows, self.dense, alpha=weight)


Term = FactorTerm | DenseTerm
Planned = list[tuple[Term, float, str]]  # (term, weight, label of its adapter) per group


class WeightGroup:
    """Layers of one weight shape, device and dtype whose weights live in one stacked tensor."""

    def __init__(self, layers: list[str], modules: list[nn.Module]):
        self.layers = layers
        self.modules = modules
        self.params = [module.weight for module in modules]
        self.shape = tuple(self.params[0].shape)
        stacked = torch.stack([param.detach() for param in self.params])
        for row, param in enumerate(self.params):
            param.data = stacked[row]
        self.live = stacked.view(len(layers), self.shape[0], -1)  # (n, out, in_flat)
        self.pristine = self.live.clone()
        self.max_abs = float(torch.linalg.vector_norm(self.pristine, float("inf")))  # max |W0| (NaN if W0 is not finite)
        self.written: Planned | None = None  # what is merged now; None: pristine
        self._pointers = [param.data_ptr() for param in self.params]
        self._checks = [(module._parameters, param, pointer) for module, param, pointer in zip(modules, self.params, self._pointers)]

    @property
    def device(self) -> torch.device:
        return self.live.device

    @property
    def dtype(self) -> torch.dtype:
        return self.live.dtype

    def intact(self) -> bool:
        """True while every module still holds its parameter, still a view of the stack."""
        for parameters, param, pointer in self._checks:
            if parameters.get("weight") is not param or param.data_ptr() != pointer:
                return False
        return True

    def write(self, terms: Planned) -> None:
        limit = torch.finfo(self.dtype).max
        if any(not abs(weight) <= limit for _, weight, _ in terms):
            raise NonFiniteMerge([(self, list(terms))])  # torch would refuse the scalar itself
        self.written = list(terms)  # before writing: a failure half-way is restored from W0
        base: Tensor | None = self.pristine
        for term, weight, _ in terms:
            term.apply(self.live, base, weight)
            base = None
        if base is not None:
            self.live.copy_(self.pristine)
            self.written = None

    def restore(self) -> None:
        if self.written is not None:
            self.live.copy_(self.pristine)
            self.written = None

    def release(self) -> None:
        """Put W0 into every member and give each module its own weight storage again.

        A member whose weight was moved or replaced behind the group's back (``pipe.to(...)``)
        gets W0 copied into whatever tensor it holds now.
        """
        for row, (module, param) in enumerate(zip(self.modules, self.params)):
            pristine = self.pristine[row].view(self.shape)
            current = module._parameters.get("weight")
            if current is param and param.data_ptr() == self._pointers[row]:
                param.data = pristine.clone()
            elif current is not None and tuple(current.shape) == self.shape:
                current.data.copy_(pristine.to(current.device, current.dtype))
        self.written = None


class NonFiniteMerge(Exception):
    """Raised by ``MergedWeights.write`` with the groups whose merged weights are not finite."""

    def __init__(self, groups: list[tuple[WeightGroup, Planned]]):
        super().__init__(f"{len(groups)} weight group(s) not finite after merging")
        self.groups = groups


class MergedWeights:
    """Pristine copies of the touched weights of some modules, and what is merged into them now."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.groups: list[WeightGroup] = []
        self._where: dict[str, tuple[WeightGroup, int]] = {}

    def shape2d(self, layer: str) -> tuple[int, int]:
        weight = self.modules[layer].weight
        return int(weight.shape[0]), int(weight[0].numel())

    def place(self, layers: Sequence[str]) -> dict[WeightGroup, list[tuple[int, str]]]:
        """The (row, layer) pairs of ``layers`` per group, forming groups for layers not in one yet.

        Layers are only ever written through groups, so a layer outside every group is pristine.
        Groups never change once formed (their stacks are what prepared terms are built for).
        """
        new: dict[tuple, list[str]] = {}
        seen: set[int] = set()
        for layer in layers:
            if layer not in self._where:
                weight = self.modules[layer].weight
                if id(weight) in seen:
                    raise ConfigError(f"layer {layer} shares its weight with another targeted layer (tied weights cannot be merged)")
                seen.add(id(weight))
                new.setdefault((weight.device, weight.dtype, tuple(weight.shape)), []).append(layer)
        with torch.no_grad():
            for members in new.values():
                group = WeightGroup(members, [self.modules[layer] for layer in members])
                self.groups.append(group)
                self._where.update({layer: (group, row) for row, layer in enumerate(members)})
        placed: dict[WeightGroup, list[tuple[int, str]]] = {}
        for layer in layers:
            group, row = self._where[layer]
            placed.setdefault(group, []).append((row, layer))
        return placed

    def live2d(self, layer: str) -> Tensor:
        """The live weight of a layer as a 2-D view."""
        if layer in self._where:
            group, row = self._where[layer]
            return group.live[row]
        weight = self.modules[layer].weight
        return weight.detach().view(weight.shape[0], -1)

    def pristine2d(self, layer: str) -> Tensor:
        """W0 of a layer (the live weight itself for layers never written)."""
        if layer in self._where:
            group, row = self._where[layer]
            return group.pristine[row]
        return self.live2d(layer)

    @property
    def touched(self) -> list[str]:
        """Layers of groups whose live weights differ from W0 now."""
        return [layer for group in self.groups if group.written is not None for layer in group.layers]

    def intact(self) -> bool:
        return all(group.intact() for group in self.groups)

    @torch.no_grad()
    def write(self, plan: dict[WeightGroup, Planned], check_finite: bool = True) -> None:
        """Make each planned group ``W0 + sum(w * dW)``, every other group W0.

        Groups whose terms are already merged are not rewritten. With ``check_finite`` each group
        written now is proven finite without reading it where possible: ``max|W0| + sum |w| *
        bound(term)`` (bounds computed once per prepared term) within half the dtype's range
        cannot overflow, and finite inputs give no NaN. Other groups are checked exactly (one
        fp32 sum each, one sync). If any is not finite every group is put back to W0 and
        ``NonFiniteMerge`` names them.
        """
        written: list[WeightGroup] = []
        try:
            for group in self.groups:
                terms = plan.get(group)
                if not terms:
                    group.restore()
                elif not _same(group.written, terms):
                    group.write(terms)
                    written.append(group)
            unproven = [group for group in written if check_finite and not _proven_finite(group)]
            if unproven:
                written = unproven
                sums = torch.stack([group.live.sum(dtype=torch.float32) for group in written])
                finite = torch.isfinite(sums).tolist()
                if not all(finite):
                    bad = [(group, list(group.written or [])) for group, ok in zip(written, finite) if not ok]
                    raise NonFiniteMerge(bad)
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> None:
        """Put W0 back into every group."""
        for group in self.groups:
            group.restore()

    @torch.no_grad()
    def release(self) -> None:
        """W0 back into every module, each with its own weight storage; the groups are forgotten.

        Call it before handing the modules to code that expects ordinary parameters (saving a
        pipeline, moving it to another device); the next write forms the groups again.
        """
        for group in self.groups:
            group.release()
        self.groups, self._where = [], {}


def _proven_finite(group: WeightGroup) -> bool:
    """True when the group's merged weights cannot exceed half its dtype's range (no read of W)."""
    total = group.max_abs + sum(abs(weight) * term.bound for term, weight, _ in group.written or [])
    return total <= 0.5 * torch.finfo(group.dtype).max


def _same(old: Planned | None, new: Planned) -> bool:
    if old is None or len(old) != len(new):
        return False
    return all(a is b and wa == wb for (a, wa, _), (b, wb, _) in zip(old, new))


def culprit(group: WeightGroup, terms: Planned) -> tuple[str, float, str]:
    """(adapter label, weight, layer) of the term that alone makes a group non-finite (failure path)."""
    limit = torch.finfo(group.dtype).max
    with torch.no_grad():
        for term, weight, label in terms:
            if not abs(weight) <= limit:
                return label, weight, group.layers[0]
            scratch = group.pristine.clone()
            term.apply(scratch, group.pristine, weight)
            rows = (~torch.isfinite(scratch.flatten(1).sum(1, dtype=torch.float32))).nonzero().flatten().tolist()
            if rows:
                return label, weight, group.layers[rows[0]]
    label = " + ".join(f"{label} ({weight:g})" for _, weight, label in terms)
    return label, float("nan"), group.layers[0]


# ---------------------------------------------------------------------------------- preparing


def factors_cheaper(rank: int, shape: tuple[int, int]) -> bool:
    """Factors are kept when they take at most half the memory of the dense dW."""
    return rank * (shape[0] + shape[1]) * 2 <= shape[0] * shape[1]


def _check_shape(layer: str, got: tuple[int, ...], want: tuple[int, int]) -> None:
    if tuple(got) != tuple(want):
        raise KeyMismatchError(f"layer {layer}: the adapter's update has shape {tuple(got)}, the pipeline's weight is {tuple(want)}")


def layer_update(adapter: Any, layer: str, shape: tuple[int, int], merge_from: MergeFrom) -> tuple[Tensor, Tensor] | Tensor:
    """One layer's update at strength 1 as ``(down (r, in), up (out, r))`` or a dense ``(out, in)``.

    ``merge_from``: ``factors`` (where declared), ``dense``, or ``auto`` (factors where declared
    and at most half the size of dW).
    """
    if merge_from != "dense" and capabilities(adapter).factors:
        down, up = adapter.factors(layer)
        rank = int(down.shape[0])
        if merge_from == "factors" or factors_cheaper(rank, shape):
            down, up = down.detach().reshape(rank, -1), up.detach().reshape(-1, rank)
            _check_shape(layer, (up.shape[0], down.shape[1]), shape)
            return down, up
    dense = adapter.delta(layer).detach()
    if dense.numel() != shape[0] * shape[1]:
        _check_shape(layer, tuple(dense.shape), shape)
    return dense.reshape(shape)


@torch.no_grad()
def group_terms(adapter: Any, weights: MergedWeights, merge_from: MergeFrom = "auto") -> dict[WeightGroup, list[Term]]:
    """An adapter's updates as terms per group, on each group's device and dtype."""
    terms: dict[WeightGroup, list[Term]] = {}
    for group, rows in weights.place(adapter.layers()).items():
        shape = (group.live.shape[1], group.live.shape[2])
        factored: list[tuple[int, Tensor, Tensor]] = []
        dense: list[tuple[int, Tensor]] = []
        for row, layer in rows:
            update = layer_update(adapter, layer, shape, merge_from)
            if isinstance(update, tuple):
                factored.append((row, *update))
            else:
                dense.append((row, update))
        terms[group] = _factor_term(group, factored) + _dense_term(group, dense)
    return terms


def _factor_term(group: WeightGroup, factored: list[tuple[int, Tensor, Tensor]]) -> list[Term]:
    if not factored:
        return []
    n, out_features, in_features = group.live.shape
    rank = max(int(down.shape[0]) for _, down, _ in factored)
    downs = torch.zeros(n, rank, in_features)
    ups = torch.zeros(n, out_features, rank)
    for row, down, up in factored:
        downs[row, : down.shape[0]] = down.float().cpu()
        ups[row, :, : up.shape[1]] = up.float().cpu()
    down_cast, up_cast = downs.to(group.device, group.dtype), ups.to(group.device, group.dtype)
    return [FactorTerm(down_cast, up_cast, _bound(down_cast, up_cast))]


def _bound(down: Tensor, up: Tensor) -> float:
    """An upper bound of every entry of ``up[b] @ down[b]``: ``sum_k max_i |up_ik| * max_j |down_kj|``."""
    up_max = up.float().abs().amax(dim=1)  # (n, R)
    down_max = down.float().abs().amax(dim=2)  # (n, R)
    return float((up_max * down_max).sum(dim=1).max()) * (1 + 1e-3) if up.numel() else 0.0


def _dense_term(group: WeightGroup, dense: list[tuple[int, Tensor]]) -> list[Term]:
    if not dense:
        return []
    rows = [row for row, _ in dense]
    stacked = torch.stack([matrix.to(group.device, group.dtype) for _, matrix in dense]).contiguous()
    bound = float(stacked.float().abs().max()) if stacked.numel() else 0.0
    if rows == list(range(group.live.shape[0])):
        return [DenseTerm(stacked, None, bound)]
    return [DenseTerm(stacked, torch.tensor(rows, device=group.device, dtype=torch.int64), bound)]


def first_non_finite(terms: dict[WeightGroup, list[Term]]) -> str | None:
    """The first layer whose prepared update (cast to the weight's dtype) is not finite, if any."""
    for group, group_list in terms.items():
        for term in group_list:
            if isinstance(term, FactorTerm):
                per_row = term.down.flatten(1).sum(1, dtype=torch.float32) + term.up.flatten(1).sum(1, dtype=torch.float32)
                rows = list(range(group.live.shape[0]))
            else:
                per_row = term.dense.flatten(1).sum(1, dtype=torch.float32)
                rows = term.rows.tolist() if term.rows is not None else list(range(group.live.shape[0]))
            bad = (~torch.isfinite(per_row)).nonzero().flatten().tolist()
            if bad:
                return group.layers[rows[bad[0]]]
    return None


def component_modules(root: nn.Module, component: str = "unet") -> dict[str, nn.Module]:
    """Every Linear / Conv2d of one component, keyed ``"<component>.<module name>"`` (adapter layer names)."""
    return {f"{component}.{name}": module for name, module in root.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


@contextlib.contextmanager
def merged(modules: dict[str, nn.Module], adapter: Any, weight: float = 1.0, merge_from: MergeFrom = "auto") -> Iterator[MergedWeights]:
    """``with merged(modules, adapter, 0.8): ...``: W0 + weight * dW written in, W0 back in ``finally``.

    ``modules`` maps the adapter's layer names to modules (e.g. ``{"unet." + name: module}``).
    The modules get their own weight storage back on exit. Raises ``NonFiniteMerge`` (weights
    restored) if the merged weights are not finite.
    """
    missing = [layer for layer in adapter.layers() if layer not in modules]
    if missing:
        raise KeyMismatchError(f"adapter targets {len(missing)} layers the modules lack, e.g. {missing[0]}")
    weights = MergedWeights(modules)
    try:
        plan = {group: [(term, weight, "") for term in terms] for group, terms in group_terms(adapter, weights, merge_from).items()}
        weights.write(plan)
        yield weights
    finally:
        weights.release()


# The hooked half lives in studio/engine/hooks.py; it is part of this module's API.
from studio.engine.hooks import Attachment, UpdateHooks, apply_chain  # noqa: E402

__all__ = [
    "Attachment", "DenseTerm", "FactorTerm", "MergedWeights", "NonFiniteMerge", "UpdateHooks", "WeightGroup",
    "apply_chain", "component_modules", "culprit", "group_terms", "merged",
]
