"""DIN and its baseline (paper Sections 4.1 and 4.3), built only on din_kernels' public API.

Both models embed the candidate and every behaviour as ``[goods_emb, cate_emb]`` (id 0 = padding), pool
the behaviours into one user-interest vector, and feed ``[user profile?, pooled, candidate,
pooled * candidate]`` to an MLP (200-80, Dice or PReLU) that ends in one logit. The product term follows
the official DIN code. The only difference is the pooling: ``BaseModel`` sums the valid behaviours
(paper: "sum pooling"), ``DIN`` weights each by the local activation unit's score for the candidate.

With ``history_search`` (:mod:`din.search`, SIM's retrieval) either model first keeps, per candidate, at most
``search_top_k`` behaviours of the (long) history related to it, and pools only those.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

import din_kernels as dk

from .features import EMBEDDING_INITS, ItemEmbedding, init_embedding_
from .search import SEARCH_MODES, category_search, gather_history, inner_product_search

Tensor = torch.Tensor

MODELS = ("din", "base")
HEAD_ACTIVATIONS = ("dice", "prelu")
ATTENTION_ACTIVATIONS = dk.ACTIVATIONS
ATTENTION_NORMALIZE = ("none", "softmax")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (stored in checkpoints)."""

    model: str = "din"                      # "din" | "base"
    num_goods: int = 1
    num_cates: int = 1
    num_users: int = 0                      # > 0 with use_user: a user-id embedding joins the MLP input
    goods_dim: int = 18
    cate_dim: int = 18
    user_dim: int = 18
    use_user: bool = False
    hidden_units: Tuple[int, ...] = (200, 80)
    activation: str = "dice"                # head MLP activation: "dice" | "prelu"
    attention_units: Tuple[int, ...] = (80, 40)
    attention_activation: str = "sigmoid"
    attention_form: str = "concat"
    attention_normalize: str = "none"       # paper: "none"; official code: "softmax" with scale D**-0.5
    attention_scale: Optional[float] = None
    # Every table (goods, category, user) starts from this; N(0, 1e-4^2) as DeepCTR-Torch and FuxiCTR. It
    # decides quality more than any other default: nn.Embedding's N(0, 1) lost ~0.1 GAUC (docs/results.md).
    embedding_init: str = "normal"          # see din.features.EMBEDDING_INITS
    embedding_init_std: float = 1e-4
    head_input_norm: bool = True            # BatchNorm on the MLP input, as the official code (DeepCTR: none)
    product_term: bool = True               # pooled * candidate in the MLP input, as the official code
    # Search before attention (din.search): "none" pools the whole history the data feeds (its last max_len
    # behaviours); "category" / "inner-product" first keep at most search_top_k of them per candidate, so a
    # long max_len costs O(search_top_k) attention
    history_search: str = "none"            # "none" | "category" | "inner-product"
    search_top_k: int = 50

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"activation must be one of {HEAD_ACTIVATIONS}, got {self.activation!r}")
        if self.attention_activation not in ATTENTION_ACTIVATIONS:
            raise ValueError(f"attention_activation must be one of {ATTENTION_ACTIVATIONS}, "
                             f"got {self.attention_activation!r}")
        if self.attention_normalize not in ATTENTION_NORMALIZE:
            raise ValueError(f"attention_normalize must be one of {ATTENTION_NORMALIZE}, "
                             f"got {self.attention_normalize!r}")
        for name in ("num_goods", "num_cates", "goods_dim", "cate_dim", "user_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.use_user and self.num_users <= 0:
            raise ValueError("use_user=True needs num_users > 0")
        self.hidden_units = tuple(self.hidden_units)
        self.attention_units = tuple(self.attention_units)
        for name in ("hidden_units", "attention_units"):
            units = getattr(self, name)
            if not units or any(isinstance(u, bool) or not isinstance(u, int) or u <= 0 for u in units):
                raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {units!r}")
        for name in ("head_input_norm", "product_term", "use_user"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.embedding_init not in EMBEDDING_INITS:
            raise ValueError(f"embedding_init must be one of {EMBEDDING_INITS}, got {self.embedding_init!r}")
        if self.history_search not in SEARCH_MODES:
            raise ValueError(f"history_search must be one of {SEARCH_MODES}, got {self.history_search!r}")
        k = self.search_top_k
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"search_top_k must be a positive int, got {k!r}")
        std = self.embedding_init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not (std > 0 and std < float("inf")):
            raise ValueError(f"embedding_init_std must be a finite number > 0, got {std!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**values)


class _Activation(nn.Module):
    """Dice (batch statistics) or PReLU (one slope per unit) for the head MLP."""

    def __init__(self, kind: str, width: int):
        super().__init__()
        self.fn = dk.Dice(width) if kind == "dice" else nn.PReLU(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class _Head(nn.Module):
    """``BatchNorm -> [Linear -> act] * len(hidden) -> Linear(.., 1)``; the input norm as in the official code.
    With Dice the layers after the norm run as one op (``din_kernels.dice_mlp``) over these modules'
    parameters and statistics (the state_dict is that of the modules)."""

    def __init__(self, in_features: int, hidden_units: Tuple[int, ...], activation: str, input_norm: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features) if input_norm else nn.Identity()
        layers = []
        width = in_features
        for units in hidden_units:
            layers += [nn.Linear(width, units), _Activation(activation, units)]
            width = units
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        linears, dices = list(self.mlp)[0::2], [act.fn for act in list(self.mlp)[1::2]]
        # the Linear and Dice layers as one op (din_kernels.dice_mlp), unless a layer was replaced by one with
        # other statistics (din.distributed's SyncDice: the global batch's)
        if dices and all(type(d) is dk.Dice and not d.affine for d in dices):
            logits = dk.dice_mlp(x, [t for m in linears for t in (m.weight, m.bias)], [d.alpha for d in dices],
                                 [d.running_mean for d in dices], [d.running_var for d in dices],
                                 training=self.training, momentum=dices[0].momentum, eps=dices[0].eps)
        else:
            logits = self.mlp(x)
        return logits.squeeze(-1)  # [B]


class _InterestModel(nn.Module):
    """Shared body: embeddings, pooling (subclass), head."""

    def __init__(self, config: ModelConfig, goods_table: Optional[nn.Module] = None,
                 cate_table: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        self.items = ItemEmbedding(config.num_goods, config.num_cates, config.goods_dim, config.cate_dim,
                                   goods_table=goods_table, cate_table=cate_table)
        self.users = nn.Embedding(config.num_users, config.user_dim, padding_idx=0) if config.use_user else None
        tables = [self.items.goods, self.items.cates] + ([self.users] if self.users is not None else [])
        for table in tables:  # custom tables too (MBA): the init is the model's, not the table class's
            init_embedding_(table.weight, config.embedding_init, config.embedding_init_std,
                            padding_idx=getattr(table, "padding_idx", 0))
        dim = self.items.dim
        in_features = (3 if config.product_term else 2) * dim + (config.user_dim if config.use_user else 0)
        self.head = _Head(in_features, config.hidden_units, config.activation, config.head_input_norm)

    def pool(self, candidate: Tensor, behaviours: Tensor, lengths: Tensor) -> Tensor:
        """candidate [B, D] or [B, C, D], behaviours [B, T, D], lengths [B] -> the user interest, shaped as
        the candidate."""
        raise NotImplementedError  # each model defines its pooling

    def search(self, batch) -> Tuple[Tensor, Tensor, Tensor]:
        """The history the pooling sees: ``(hist_goods, hist_cates, lengths)``, the batch's own, or with
        ``config.history_search`` the behaviours retrieved for each candidate (:mod:`din.search`), cut to
        the most any row kept (at least 1) so that the attention spends nothing on all-padding columns."""
        goods, cates, lengths = batch.hist_goods, batch.hist_cates, batch.lengths  # [B, T], [B, T], [B]
        mode, top_k = self.config.history_search, self.config.search_top_k
        if mode == "none":
            return goods, cates, lengths
        if mode == "category":  # ids only: the behaviours it drops are never embedded
            positions, kept = category_search(cates, lengths, batch.cate, top_k)
        else:
            with torch.no_grad():  # scoring only; the retained behaviours are embedded again, with gradient
                query, keys = self.items(batch.goods, batch.cate), self.items(goods, cates)
            positions, kept = inner_product_search(query, keys, lengths, top_k)
        # (.item() waits for a GPU; the attention it saves on a long history is worth far more)
        width = max(1, int(kept.max())) if len(kept) else 1
        positions = positions[:, :width]
        if positions.shape[1] < width:  # an empty history (T = 0): one padding column, as a batch has
            positions = torch.zeros(len(kept), width, dtype=positions.dtype, device=positions.device)
        return gather_history(goods, positions, kept), gather_history(cates, positions, kept), kept

    def forward(self, batch) -> Tensor:
        """batch: ``din.data.Batch`` -> logits [B]."""
        hist_goods, hist_cates, lengths = self.search(batch)              # [B, T'] each, [B]
        return self._logits(hist_goods, hist_cates, lengths, batch.goods, batch.cate, batch.user)

    def score_candidates(self, hist_goods: Tensor, hist_cates: Tensor, lengths: Tensor, goods: Tensor,
                         cates: Tensor, user: Optional[Tensor] = None) -> Tensor:
        """C candidates per history: hist_goods, hist_cates [B, T], lengths [B], goods, cates [B, C] and
        (with ``use_user``) user [B] -> logits [B, C]; row b's candidates are scored against history b.

        The logits equal ``forward`` on a batch that repeats each history once per candidate, but the
        history is embedded once and the attention reads it once for all C candidates (din_attention's
        query [B, C, D]); the head then runs on B * C rows. Arguments are not validated here beyond what the
        ops check (``din.Scorer`` checks ids against the tables)."""
        if goods.dim() != 2 or cates.shape != goods.shape or goods.shape[0] != hist_goods.shape[0]:
            raise ValueError(f"goods and cates must both be [B, C] with B={hist_goods.shape[0]} (the histories' "
                             f"rows), got {tuple(goods.shape)} and {tuple(cates.shape)}")
        if self.users is not None and user is None:
            raise ValueError("this model has a user embedding (use_user): pass user [B]")
        if self.config.history_search != "none":
            # the retrieval depends on the candidate: each candidate gets its own history (a repeated batch)
            batch, candidates = goods.shape
            repeated = types.SimpleNamespace(
                hist_goods=hist_goods.repeat_interleave(candidates, 0),
                hist_cates=hist_cates.repeat_interleave(candidates, 0),
                lengths=lengths.repeat_interleave(candidates), goods=goods.reshape(-1), cate=cates.reshape(-1),
                user=None if user is None else user.repeat_interleave(candidates))
            return self.forward(repeated).view(batch, candidates)
        return self._logits(hist_goods, hist_cates, lengths, goods, cates, user)

    def _logits(self, hist_goods: Tensor, hist_cates: Tensor, lengths: Tensor, goods: Tensor, cates: Tensor,
                user: Optional[Tensor]) -> Tensor:
        """goods, cates [B] -> logits [B]; [B, C] -> [B, C]."""
        candidate, behaviours = self.items.candidate_and_history(
            goods, cates, hist_goods, hist_cates)                        # [B(, C), D], [B, T, D]
        pooled = self.pool(candidate, behaviours, lengths)              # [B(, C), D]
        parts = [pooled, candidate, pooled * candidate] if self.config.product_term else [pooled, candidate]
        if self.users is not None:
            profile = self.users(user)                                  # [B, U]
            if candidate.dim() == 3:
                profile = profile[:, None, :].expand(-1, candidate.shape[1], -1)
            parts.insert(0, profile)
        features = torch.cat(parts, dim=-1)
        # the head's BatchNorm1d and Dice take rows [N, F]: B * C of them for several candidates
        return self.head(features.reshape(-1, features.shape[-1])).view(candidate.shape[:-1])


class BaseModel(_InterestModel):
    """Embedding & MLP baseline: sum pooling over the valid behaviours."""

    def pool(self, candidate: Tensor, behaviours: Tensor, lengths: Tensor) -> Tensor:
        positions = torch.arange(behaviours.shape[1], device=behaviours.device)
        mask = (positions[None, :] < lengths[:, None]).to(behaviours.dtype)  # [B, T]
        pooled = torch.einsum("bt,btd->bd", mask, behaviours)
        return pooled[:, None, :].expand_as(candidate) if candidate.dim() == 3 else pooled


class DIN(_InterestModel):
    """Deep Interest Network: behaviours weighted by the local activation unit's relevance to the candidate."""

    def __init__(self, config: ModelConfig, goods_table: Optional[nn.Module] = None,
                 cate_table: Optional[nn.Module] = None):
        super().__init__(config, goods_table, cate_table)
        self.attention = dk.LocalActivationUnit(
            self.items.dim, hidden_units=config.attention_units, activation=config.attention_activation,
            form=config.attention_form, normalize=config.attention_normalize, scale=config.attention_scale,
        )

    def pool(self, candidate: Tensor, behaviours: Tensor, lengths: Tensor) -> Tensor:
        return self.attention(candidate, behaviours, lengths)


def build_model(config: ModelConfig, goods_table: Optional[nn.Module] = None,
                cate_table: Optional[nn.Module] = None) -> _InterestModel:
    """The model named by ``config.model``; custom embedding tables (e.g. MBA) may replace the defaults."""
    cls = DIN if config.model == "din" else BaseModel
    return cls(config, goods_table=goods_table, cate_table=cate_table)
