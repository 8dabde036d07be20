"""A Transformer decoder (Vaswani et al., 2017) over the grid of region features, in the pre-LN
arrangement (Xiong et al., 2020): every sublayer reads a LayerNorm of the residual stream and adds
its output to it, which trains stably without a learning-rate warm-up tuned to the depth.

With d = d_model = hidden_size, H heads of d_h = d / H, f_rc the standardized feature of the
region in grid row r and column c, and w_t the word at position t (w_0 = <start>):

    memory    M = W_f f_rc + b_f + E_row[r] + E_col[c]                    (L, d), L = side^2
              M = M + SelfAttn(LN(M))                                   } encoder_layers times
              M = M + FFN(LN(M))                                        }
              M = LN(M)
    words     x_t = sqrt(d) E_word[w_t] + E_pos[t]                        (T, d)
    layer     x = x + CausalSelfAttn(LN(x))    position t reads 0..t    }
              x = x + CrossAttn(LN(x), M)      every position reads M   } decoder_layers times
              x = x + FFN(LN(x))                                        }
    output    logits_t = W_o LN(x_t) + b_o                                (V,)

    Attn(y, z) = W_out concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h,  Q = W_q y, [K; V] = W_kv z
    FFN(x)     = W_2 relu(W_1 x + b_1) + b_2

Dropout (`config.dropout`) acts on the words' and the regions' input sums, on every sublayer's
output before it is added, and in the head. Position embeddings are learned, for the words as for
the grid: a caption has at most a few dozen positions, where a learned table does as well as
sinusoids (Vaswani et al., Table 3) and fits the learned grid table; a longer input is an error.
The feed-forward block uses ReLU, the original's choice and that of the captioning transformers
since: GELU brings nothing measurable at these sizes and costs an erf per value on a CPU.

Fast where the plain layers (tests/plain_decoders.PlainTransformer) are slow:
- attention is `F.scaled_dot_product_attention` (flash kernels on a GPU and a CPU), with one
  product for the queries, keys and values of self-attention and one for the keys and values of
  cross-attention;
- teacher forcing runs all positions in one pass under a causal mask; captions are padded only at
  their end, so the mask alone keeps every real query off the padding;
- an image's memory and every layer's cross-attention keys and values are computed once per image
  (`encode`), and its k captions' queries meet them in one attention call, k * T queries long;
- the head runs on the real tokens only;
- decoding keeps each layer's self-attention keys and values (the state), so a step computes one
  position, not the prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.models.base import (
    CaptionDecoder,
    DecoderConfig,
    Dropout,
    Memory,
    RealTokens,
    State,
    length_mask,
    rows_per_image,
    select_rows,
)
from captioner.text import PAD_ID

# Standard deviation of the learned position tables at the start: small beside the unit-scale
# word embeddings and projected features, so that training starts mostly from content.
_POSITION_INIT_STD = 0.02


def check_config(config: DecoderConfig) -> None:
    """Refuse sizes the transformer cannot be built with, in one line (ValueError)."""
    width, heads = config.hidden_size, config.heads
    rules = {
        f"embed_size == hidden_size (d_model; got {config.embed_size} and {width})": (
            config.embed_size == width
        ),
        "heads >= 1": heads >= 1,
        f"hidden_size divisible by heads (got {width} and {heads})": heads >= 1
        and width % heads == 0,
        "decoder_layers >= 1": config.decoder_layers >= 1,
        "ff_size >= 1": config.ff_size >= 1,
        "encoder_layers >= 0": config.encoder_layers >= 0,
        "max_positions >= 1": config.max_positions >= 1,
        "max_grid_side >= 1": config.max_grid_side >= 1,
    }
    broken = [rule for rule, holds in rules.items() if not holds]
    if broken:
        raise ValueError(f"transformer sizes must satisfy {', '.join(broken)}")


def _split_heads(projected: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    """(B, T, parts * d) -> `parts` views (B, H, T, d_h): the queries, keys or values of a fused
    projection, each cut into heads.

    The views keep the projection's memory layout, which the attention kernels read as it is,
    and unbind's backward stacks their gradients back into it in one pass, ready for the
    projection's own backward."""
    split = projected.unflatten(-1, (parts, heads, -1)).unbind(2)  # (B, T, H, d_h) each
    return tuple(part.transpose(1, 2) for part in split)


def _merge_heads(attended: Tensor) -> Tensor:
    """(B, H, T, d_h) -> (B, T, H * d_h)."""
    return attended.transpose(1, 2).flatten(2)


class _SelfAttention(nn.Module):
    """Multi-head self-attention with one fused projection to queries, keys and values."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(width, 3 * width)  # [W_q; W_k; W_v] stacked
        self.output = nn.Linear(width, width)

    def forward(
        self, x: Tensor, causal: bool, cache: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, d) -> (B, T, d). With `causal`, position i attends to positions <= i only.

        With a `cache` (B, t, 2d) of the keys and values of the t positions before, x is one new
        position, which attends to them all and to itself (no mask needed); then also the cache
        grown to t + 1 positions, else None."""
        projected = self.query_key_value(x)  # (B, T, 3d)
        if cache is None:
            queries, keys, values = _split_heads(projected, 3, self.heads)
        else:
            width = x.size(-1)
            cache = torch.cat([cache, projected[..., width:]], 1)  # (B, t + 1, 2d)
            (queries,) = _split_heads(projected[..., :width], 1, self.heads)
            keys, values = _split_heads(cache, 2, self.heads)
        attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=causal)
        return self.output(_merge_heads(attended)), cache


class _CrossAttention(nn.Module):
    """Multi-head attention from word positions to the regions of their image, with one fused
    projection to the regions' keys and values."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)  # [W_k; W_v] stacked
        self.output = nn.Linear(width, width)

    def forward(
        self, x: Tensor, keys_values: Tensor, return_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x (R, T, d) -> (R, T, d) for R = G * k rows, k consecutive rows for each of the G
        images of `keys_values` (G, L, 2d), `self.key_value` of the regions: the k rows' k * T
        queries of an image meet its keys in one call, so they share them without copies.

        With `return_weights`, also the attention weights averaged over the heads (R, T, L),
        computed here (SDPA does not return them); otherwise None."""
        rows, steps, width = x.shape
        images = keys_values.size(0)
        queries = self.query(x).view(images, -1, width)  # (G, kT, d)
        (queries,) = _split_heads(queries, 1, self.heads)  # (G, H, kT, d_h)
        keys, values = _split_heads(keys_values, 2, self.heads)  # (G, H, L, d_h) each
        if return_weights:
            scores = queries @ keys.transpose(2, 3) / math.sqrt(queries.size(-1))  # (G, H, kT, L)
            attention = scores.softmax(-1)
            attended = attention @ values
            average = attention.mean(1).view(rows, steps, -1)  # (R, T, L)
        else:
            attended = F.scaled_dot_product_attention(queries, keys, values)  # (G, H, kT, d_h)
            average = None
        return self.output(_merge_heads(attended).view(rows, steps, width)), average


def _feed_forward(width: int, inner: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, inner), nn.ReLU(), nn.Linear(inner, width))


class _EncoderLayer(nn.Module):
    """A pre-LN encoder layer over an image's regions: self-attention, then feed-forward."""

    def __init__(self, width: int, heads: int, ff_size: int, dropout: float) -> None:
        super().__init__()
        self.self_attention_norm = nn.LayerNorm(width)
        self.self_attention = _SelfAttention(width, heads)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = _feed_forward(width, ff_size)
        self.dropout = Dropout(dropout)

    def forward(self, regions: Tensor) -> Tensor:
        """(G, L, d) -> (G, L, d)."""
        attended, _ = self.self_attention(self.self_attention_norm(regions), causal=False)
        regions = regions + self.dropout(attended)
        return regions + self.dropout(self.feed_forward(self.feed_forward_norm(regions)))


class _DecoderLayer(nn.Module):
    """A pre-LN decoder layer: causal self-attention, cross-attention to the regions, then
    feed-forward."""

    def __init__(self, width: int, heads: int, ff_size: int, dropout: float) -> None:
        super().__init__()
        self.self_attention_norm = nn.LayerNorm(width)
        self.self_attention = _SelfAttention(width, heads)
        self.cross_attention_norm = nn.LayerNorm(width)
        self.cross_attention = _CrossAttention(width, heads)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = _feed_forward(width, ff_size)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        keys_values: Tensor,
        cache: Tensor | None = None,
        return_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (R, T, d) -> (R, T, d); the grown `cache` (as `_SelfAttention`); with
        `return_weights`, the cross-attention weights (R, T, L).

        Without a `cache`, all T positions of a caption at once (teacher forcing); with the
        `cache` of the positions before, one new position (decoding)."""
        attended, cache = self.self_attention(
            self.self_attention_norm(x), causal=cache is None, cache=cache
        )
        x = x + self.dropout(attended)
        attended, alpha = self.cross_attention(
            self.cross_attention_norm(x), keys_values, return_weights
        )
        x = x + self.dropout(attended)
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x))), cache, alpha


class TransformerDecoder(CaptionDecoder):
    """The pre-LN Transformer decoder of the equations above, over spatial features (G, L, C)
    with L a square number (the grid)."""

    feature_kind = "spatial"

    @property
    def max_words(self) -> int:
        """The positions after <start>: one per word (the last one's output is <end>)."""
        return self.config.max_positions - 1

    def __init__(self, config: DecoderConfig) -> None:
        check_config(config)
        super().__init__(config)
        width = config.hidden_size
        self.feature_projection = nn.Linear(config.feature_size, width)
        self.row_positions = nn.Parameter(_position_table(config.max_grid_side, width))
        self.column_positions = nn.Parameter(_position_table(config.max_grid_side, width))
        self.encoder_layers = nn.ModuleList(
            _EncoderLayer(width, config.heads, config.ff_size, config.dropout)
            for _ in range(config.encoder_layers)
        )
        self.memory_norm = nn.LayerNorm(width)
        self.word_positions = nn.Parameter(_position_table(config.max_positions, width))
        self.layers = nn.ModuleList(
            _DecoderLayer(width, config.heads, config.ff_size, config.dropout)
            for _ in range(config.decoder_layers)
        )
        self.output_norm = nn.LayerNorm(width)
        self.input_dropout = Dropout(config.dropout)
        # Word embeddings of standard deviation d^-1/2, scaled by d^1/2 as in Vaswani et al.:
        # inputs of unit scale, as the projected standardized features are.
        self.embedding_scale = math.sqrt(width)
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, 1.0 / self.embedding_scale)
            self.embedding.weight[PAD_ID].zero_()

    # --- the step API ------------------------------------------------------------------------

    def encode(self, features: Tensor) -> Memory:
        """Spatial features (G, L, C) -> memory: for each decoder layer, the keys and values
        (G, L, 2d) its cross-attention reads, computed once per image."""
        regions = self._regions(features)  # (G, L, d)
        return tuple(layer.cross_attention.key_value(regions) for layer in self.layers)

    def init_state(self, memory: Memory) -> State:
        """An empty cache: for each layer, the self-attention keys and values (G, 0, 2d) of no
        positions yet, one row per memory row."""
        # (empty slices of the memory, so of its batch size, width, dtype and device)
        return tuple(keys_values[:, :0] for keys_values in memory)

    def advance(
        self, embedded: Tensor, state: State, memory: Memory
    ) -> tuple[Tensor, State, Tensor]:
        """One new position from the embedded words (R, d) and the cache of the positions
        before (its length is the new position's index): logits (R, V), the cache one position
        longer, and alpha (R, L), the last layer's cross-attention weights averaged over heads."""
        x = self._words(embedded.unsqueeze(1), start=state[0].size(1))  # (R, 1, d)
        cache = []
        for layer, keys_values, layer_cache in zip(self.layers, memory, state, strict=True):
            x, layer_cache, alpha = layer(
                x, keys_values, layer_cache, return_weights=layer is self.layers[-1]
            )
            cache.append(layer_cache)
        return self.head(self.output_norm(x.squeeze(1))), tuple(cache), alpha.squeeze(1)

    # --- teacher forcing ---------------------------------------------------------------------

    def real_tokens(
        self, features: Tensor, image_index: Tensor, captions: Tensor, lengths: Tensor
    ) -> RealTokens:
        """Every position of every caption in one pass under the causal mask; the output norm and
        the head run on the real tokens only."""
        memory = self.encode(features)
        if rows_per_image(image_index, features.size(0)) is None:
            # images with unequal numbers of captions: one memory row per caption
            memory = select_rows(memory, image_index)
        steps = int(lengths.max()) - 1
        x = self._words(self.embedding(captions[:, :steps]), start=0)  # (B, T, d)
        for layer, keys_values in zip(self.layers, memory, strict=True):
            x, _, _ = layer(x, keys_values)
        mask = length_mask(lengths.to(captions.device) - 1, steps)
        caption_of, position = mask.nonzero().unbind(1)  # in the order of x[mask]
        return RealTokens(
            logits=self.head(self.output_norm(x[mask])),
            targets=captions[:, 1 : steps + 1][mask],
            captions=caption_of,
            positions=position,
            penalty=None,
        )

    # --- inputs ------------------------------------------------------------------------------

    def _regions(self, features: Tensor) -> Tensor:
        """Spatial features (G, L, C) -> the memory M (G, L, d) of the equations."""
        regions = self.feature_projection(self.standardize(features))
        regions = self.input_dropout(regions + self._grid_positions(features.size(1)))
        for layer in self.encoder_layers:
            regions = layer(regions)
        return self.memory_norm(regions)

    def _grid_positions(self, count: int) -> Tensor:
        """(L, d): E_row[r] + E_col[c] of region r * side + c, the order of a (C, H, W) feature
        map flattened."""
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"the transformer reads a square grid of regions, not {count}")
        if side > self.config.max_grid_side:
            raise ValueError(
                f"a {side}x{side} grid exceeds the transformer's max_grid_side of "
                f"{self.config.max_grid_side}"
            )
        rows, columns = self.row_positions[:side], self.column_positions[:side]
        return (rows.unsqueeze(1) + columns.unsqueeze(0)).flatten(0, 1)

    def _words(self, embedded: Tensor, start: int) -> Tensor:
        """Embedded words (R, T, d) at positions start .. start + T - 1 -> the inputs x of the
        first layer (R, T, d)."""
        end = start + embedded.size(1)
        if end > self.config.max_positions:
            raise ValueError(
                f"the transformer reads at most max_positions={self.config.max_positions} "
                f"positions (<start> and the words), not {end}"
            )
        return self.input_dropout(embedded * self.embedding_scale + self.word_positions[start:end])


def _position_table(positions: int, width: int) -> Tensor:
    return torch.randn(positions, width) * _POSITION_INIT_STD
