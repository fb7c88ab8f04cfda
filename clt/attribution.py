"""Attribution graphs over the replacement model, and circuit-tracer's graph scores.

    graph = attribute(lm, clt, tokens, layers)            # one prompt, BOS at position 0
    replacement, completeness = graph_scores(graph)
    attribution_scores(lm, clt, prompts, layers)          # mean over prompts [P, T]

The definitions are circuit-tracer's (decoderesearch/circuit-tracer, formerly
safety-research/circuit-tracer, read at commit 4bb8c0e from
``attribution/attribute_transformerlens.py``, ``attribution/context_transformerlens.py``,
``attribution/targets.py``, ``replacement_model/replacement_model_transformerlens.py``,
``transcoder/cross_layer_transcoder.py`` and ``graph.py``); the code is our own.

**Local replacement model.** The LM runs on the prompt once; then attention patterns and every
normalization scale (``hook_scale`` of ln1, ln2, ln_final) are frozen at their values, and every
MLP output (``blocks.{l}.hook_mlp_out``, all LM layers) is a constant. What is left is linear in
the residual stream: token embeddings flow through the residual stream, the attention OV circuits
and the frozen norms. The transcoder's features sit on top: a feature at (layer, position) writes
``activation * W_dec`` (raw scale, every target layer of its reach) into the MLP outputs, and the
MLP output it misses is the **error node** of that (layer, position): ``mlp_out - reconstruction``
(the reconstruction includes ``b_dec``; an LM layer the transcoder does not cover has
reconstruction 0, so its whole MLP output is its error node). A skip connection ``x @ W_skip``
(raw scale) is part of the reconstruction and stays a linear path of the model, from the layer's
input hook to its MLP output, at every position (BOS included), as in circuit-tracer.

**Nodes**, in this order (circuit-tracer's ``Graph`` layout): active features sorted by (LM layer,
position, feature index); error nodes ``layer * T + position`` for every LM layer; one
token-embedding node per position (``W_E[token]``); the logit nodes.

**BOS.** Position 0 is the BOS position: no feature is active there and its error vectors are
zero (circuit-tracer's ``zero_positions = slice(0, 1)``); its token node stays. Its MLP outputs
are constants, as are biases and positional embeddings: none of them is a node.

**Logit nodes.** At the last position: the most likely next tokens of the original model, taken
by decreasing probability until their cumulative probability reaches ``desired_logit_prob``
(0.95), at most ``max_n_logits`` (10). A logit node's direction is its unembedding column minus
the mean column (``W_U[:, v] - W_U.mean(1)``), read after the frozen ``ln_final``; its weight in
the scores is its probability.

**Edges** ``A[target, source]``: the direct effect of the source's output vector on the target in
the linearized model, i.e. ``<target vector, J(source vector)>`` where ``J`` is the Jacobian from
the source's write to the target's read. A target feature's vector is its raw-scale encoder
column (the edge is its contribution to the pre-activation; the target's own activation function
plays no part), a logit's is its demeaned unembedding column; a source feature writes
``a * W_dec[f, t]`` to each target layer ``t`` of its reach, an error node its error vector, a
token node its embedding. Only features and logits have incoming edges.

**Computation.** A forward of ``batch_size`` copies of the prompt through the linearized model
(MLP outputs and token embeddings as leaves; the MLPs themselves are skipped, their outputs are
the clean run's), then one backward pass per batch of target nodes: batch row ``b`` carries target
``b``'s read, and the gradients at the leaves, contracted with the source vectors, give
``batch_size`` rows at once. Features read only from strictly earlier layers: their forward stops
at the last trained layer and a batch's backward at its deepest target layer; the logits get a
second forward through every block. Measured on SmolLM2 (2 busy CPU threads), 8 trained layers,
k = 16, T = 32 (3978 target rows): about 14 s per prompt with ``batch_size = 64``, nearly all of
it the backward matmuls through attention (``~T * depth * d_model^2`` per target).

**Memory.** Only the rows that can be nonzero are stored: ``edges [n_f + n_logits, n_nodes]``
with ``n_nodes = n_f + (n_layers + 1) * T + n_logits``; the dense ``[n_nodes, n_nodes]`` matrix
exists only on request (``AttributionGraph.adjacency``). For a TopK transcoder on ``L`` layers
``n_f <= L * k * (T - 1)``: 8 layers, k = 16, T = 32 on SmolLM2 (30 layers) gives at most
3968 + 10 rows and 4970 columns, 79 MB in float32 (plus a float64 copy while scoring).
``max_edge_bytes`` turns a graph that would not fit into a clear error before any work. The
forward keeps the attention path's activations of ``batch_size * T`` tokens per block for the
backward passes (tens of MB at the sizes above).

**Scores** (``graph.py::compute_graph_scores``, unpruned). ``N = |A|`` with each row divided by its
sum (clamped at 1e-10). Influence ``I = w N + w N^2 + ...`` where ``w`` holds the logit
probabilities on the logit nodes (finite: the graph is acyclic). Replacement score
``sum_tokens I / (sum_tokens I + sum_errors I)``; completeness score
``sum_n c_n (I_n + w_n) / sum_n (I_n + w_n)`` with ``c_n = 1 - sum_{e in errors} N[n, e]``. Nodes
without incoming edges (error and token nodes) have ``c = 1`` in that definition, so a transcoder
with no active feature still scores ``completeness = (1 + replacement) / 2``, not 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_N_LOGITS = 10
DESIRED_LOGIT_PROB = 0.95
DEFAULT_BATCH = 64
MAX_EDGE_BYTES = 4 << 30
MAX_INFLUENCE_ITERATIONS = 1000


@dataclass
class AttributionGraph:
    """Direct-effect graph of one prompt; node layout in the module docstring.

    ``edges`` holds the rows of the nodes that have incoming edges: the features (rows
    ``0..n_f-1``, same order as the feature nodes) then the logits; columns are all nodes.
    """

    tokens: torch.Tensor  # [T]
    features: torch.Tensor  # [n_f, 3] int64: LM layer, position, feature index
    activations: torch.Tensor  # [n_f]
    logit_tokens: torch.Tensor  # [n_logits] vocabulary ids
    logit_probabilities: torch.Tensor  # [n_logits]
    edges: torch.Tensor  # [n_f + n_logits, n_nodes]
    n_layers: int  # LM layers: one error node per (layer, position)

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def n_logits(self) -> int:
        return self.logit_tokens.shape[0]

    @property
    def n_nodes(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits

    @property
    def errors(self) -> slice:
        """Columns of the error nodes (``layer * T + position`` from the start)."""
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def token_nodes(self) -> slice:
        return slice(self.errors.stop, self.errors.stop + self.n_pos)

    @property
    def logit_nodes(self) -> slice:
        return slice(self.n_nodes - self.n_logits, self.n_nodes)

    def row_nodes(self) -> torch.Tensor:
        """Node index of each row of ``edges``."""
        return torch.cat([torch.arange(self.n_features),
                          torch.arange(self.logit_nodes.start, self.n_nodes)])

    def adjacency(self) -> torch.Tensor:
        """Dense ``[n_nodes, n_nodes]`` (target rows, source columns): circuit-tracer's
        ``Graph.adjacency_matrix``. Zero rows for error and token nodes."""
        full = self.edges.new_zeros(self.n_nodes, self.n_nodes)
        full[self.row_nodes()] = self.edges
        return full


# ---- scores --------------------------------------------------------------------------------


def normalize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """``|matrix|`` with each row divided by its sum (clamped at 1e-10: zero rows stay zero)."""
    absolute = matrix.abs()
    return absolute / absolute.sum(dim=1, keepdim=True).clamp(min=1e-10)


def node_influence(graph: AttributionGraph, normalized: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``[n_nodes]`` total influence ``w N + w N^2 + ...`` of every node on the logits.

    ``normalized`` is ``normalize_rows(graph.edges)`` (float64 if not given). The series is a
    sum of finitely many terms (the graph is acyclic); the walk stops when no mass is left on a
    node with incoming edges.
    """
    N = normalize_rows(graph.edges.double()) if normalized is None else normalized
    rows = graph.row_nodes()
    w = N.new_zeros(N.shape[0])
    w[graph.n_features:] = graph.logit_probabilities.to(N)
    current = w @ N  # [n_nodes]
    influence = current.clone()
    for _ in range(MAX_INFLUENCE_ITERATIONS):
        mass = current[rows]
        if not mass.any():
            return influence
        current = mass @ N
        influence += current
    raise RuntimeError(f"influence did not vanish after {MAX_INFLUENCE_ITERATIONS} steps: the "
                       "graph has a cycle")


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """(replacement score, completeness score) of one unpruned graph (module docstring)."""
    N = normalize_rows(graph.edges.double())
    influence = node_influence(graph, N)
    token = influence[graph.token_nodes].sum()
    error = influence[graph.errors].sum()
    total = token + error
    replacement = float(token / total) if total > 0 else math.nan
    complete = N.new_ones(graph.n_nodes)
    complete[graph.row_nodes()] = 1 - N[:, graph.errors].sum(dim=1)
    output = influence.clone()
    output[graph.logit_nodes] += graph.logit_probabilities.to(output)
    completeness = float((complete * output).sum() / output.sum())
    return replacement, completeness


# ---- building the graph --------------------------------------------------------------------


def select_logits(
    logits: torch.Tensor,
    W_U: torch.Tensor,
    max_n_logits: int = MAX_N_LOGITS,
    desired_logit_prob: float = DESIRED_LOGIT_PROB,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logit nodes from the last position's ``logits [V]``: (ids, probabilities, directions).

    The most likely tokens until their cumulative probability reaches ``desired_logit_prob``
    (the token that crosses it included), at most ``max_n_logits``; directions are the
    demeaned unembedding columns ``W_U[:, v] - W_U.mean(1)`` as rows ``[n, d_model]``.
    """
    probs = torch.softmax(logits.double(), dim=-1)
    top_p, top_ids = probs.topk(min(max_n_logits, probs.shape[0]))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), desired_logit_prob)) + 1
    ids = top_ids[:cutoff]
    vectors = (W_U[:, ids] - W_U.mean(dim=1, keepdim=True)).T
    return ids, probs[ids].to(logits.dtype), vectors


@dataclass
class _Features:
    """Active features of one prompt in the padded layout of the codes (``N = T - 1`` non-BOS
    positions, ``K`` slots), and the raw-scale vectors that go with them."""

    column: torch.Tensor  # [L, N, K] node index of each slot, -1 if inactive
    decoders: list[torch.Tensor]  # per source s: [N, K, R_s, d_out] = a * raw W_dec
    nodes: torch.Tensor  # [n_f, 3] (LM layer, position, feature)
    activations: torch.Tensor  # [n_f]
    source: torch.Tensor  # [n_f] transcoder layer of each node (on the LM's device)
    positions: torch.Tensor  # [n_f] prompt position of each node (on the LM's device)
    encoders: torch.Tensor  # [n_f, d_in] raw-scale encoder column of each node


@torch.no_grad()
def _raw_skip(clt, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """``[L, d_in, d_out]`` skip connection on raw activations (its linear part, as the fold
    computes it: ``W_skip / std_in * std_out``), or None without one."""
    if getattr(clt, "W_skip", None) is None:
        return None
    st = clt.standardizer
    W = clt.W_skip.detach().to(device, torch.float64)
    return (W / st.in_std.to(device).unsqueeze(-1) * st.out_std.to(device).unsqueeze(1)).to(dtype)


@torch.no_grad()
def _active_features(clt, x: torch.Tensor, layers: Sequence[int], dtype: torch.dtype
                     ) -> tuple[_Features, torch.Tensor]:
    """Encode raw inputs ``x [L, N, d_in]`` (non-BOS positions); returns the active features and
    the raw reconstruction ``[L, N, d_out]`` (``b_dec`` and the skip term included) from the
    same codes."""

    st = clt.standardizer
    weight = clt.W_enc
    yhat, codes = clt(st.inputs(x.to(weight.device, weight.dtype)))  # skip term included
    recon = st.restore_targets(yhat).to(x.device, dtype)
    values = codes.values.to(x.device, dtype)
    indices = codes.indices.to(x.device).long()
    L, N, K = values.shape
    active = values != 0
    # feature nodes sorted by (layer, position, feature index), as circuit-tracer's sparse
    # activation matrix orders them
    s, n, j = active.nonzero(as_tuple=True)
    feature = indices[s, n, j]
    lm_layer = torch.tensor(list(layers), device=x.device)[s]
    order = torch.argsort((s * N + n) * clt.n_features + feature)
    s, n, j, feature, lm_layer = s[order], n[order], j[order], feature[order], lm_layer[order]
    column = torch.full((L, N, K), -1, dtype=torch.int64, device=x.device)
    column[s, n, j] = torch.arange(s.shape[0], device=x.device)
    # raw scale: pre = x_raw @ (W_enc / in_std) + const, out_raw = a * W_dec * out_std (fold)
    in_std, out_std = st.in_std.to(x.device), st.out_std.to(x.device)
    W_enc = clt.W_enc.detach().to(x.device, torch.float64)
    encoders = (W_enc[s, :, feature] / in_std[s]).to(dtype)
    decoders = []
    for src in range(L):
        R_s = clt.layout.reach_of(src)
        block = clt.decoder_view(src).detach().to(x.device, torch.float64)  # [F, R_s, d_out]
        raw = block[indices[src]] * out_std[src : src + R_s]  # [N, K, R_s, d_out]
        decoders.append((raw * values[src, :, :, None, None].double()).to(dtype))
    nodes = torch.stack([lm_layer, n + 1, feature], dim=1)
    found = _Features(column, decoders, nodes.cpu(), values[s, n, j].cpu(), s, n + 1, encoders)
    return found, recon


class _SkippedMLP(torch.nn.Module):
    """Stands in for a block's MLP during the linearized forward: the ``hook_mlp_out`` leaf
    replaces its output with the clean run's anyway, so the MLP need not run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class _Linearized:
    """The linearized forward of ``copies`` copies of the prompt: frozen patterns and norm
    scales, MLP outputs (the clean run's values) and token embeddings as leaves whose gradients
    are the Jacobian rows, input hooks captured. A transcoder's skip connection stays a linear
    path from a trained layer's input hook to its MLP output (value unchanged, circuit-tracer's
    ``skip + (out - skip).detach()``).

    The blocks' MLPs are swapped for :class:`_SkippedMLP` while it runs (they are most of a
    block's work and their outputs are constants here); the forward stops after ``depth``
    blocks.
    """

    def __init__(self, lm, in_names: list[str], layers: list[int], mlp_out: torch.Tensor,
                 skip: torch.Tensor | None) -> None:
        self.lm, self.mlp_out = lm, mlp_out  # [n_layers, T, d_model] clean MLP outputs
        # LM layer -> (input hook name, raw W_skip [d_in, d_out]) of the trained layers
        self.skips = {} if skip is None else {layer: (in_names[i], skip[i])
                                              for i, layer in enumerate(layers)}
        self.embed: torch.Tensor | None = None
        self.outputs: list[torch.Tensor | None] = [None] * lm.cfg.n_layers
        self.inputs: dict[str, torch.Tensor] = {}
        frozen = [name for name in lm.hook_dict
                  if name.endswith(".hook_scale") or name.endswith("attn.hook_pattern")]
        self.hooks = [(name, self._detach) for name in frozen]
        self.hooks.append(("hook_embed", self._embed_leaf))
        self.hooks += [(f"blocks.{layer}.hook_mlp_out", self._output_leaf(layer))
                       for layer in range(lm.cfg.n_layers)]
        self.hooks += [(name, self._capture(name)) for name in dict.fromkeys(in_names)]

    def run(self, tokens: torch.Tensor, copies: int, depth: int) -> torch.Tensor:
        """Forward of ``copies`` copies through blocks ``0..depth-1``; returns the residual
        stream ``[copies, T, d_model]`` (after ``ln_final`` when all blocks ran)."""
        lm = self.lm
        self.outputs = [None] * lm.cfg.n_layers
        self.inputs = {}
        batch = tokens[None].expand(copies, -1)
        blocks = list(lm.blocks)[:depth]
        originals = [block.mlp for block in blocks]
        try:
            for block in blocks:
                block.mlp = _SkippedMLP()
            with torch.enable_grad(), lm.hooks(fwd_hooks=self.hooks):
                resid = lm(batch, stop_at_layer=depth, attention_mask=torch.ones_like(batch))
                if depth == lm.cfg.n_layers and hasattr(lm, "ln_final"):
                    resid = lm.ln_final(resid)
        finally:
            for block, mlp in zip(blocks, originals, strict=True):
                block.mlp = mlp
        return resid

    @staticmethod
    def _detach(value: torch.Tensor, hook) -> torch.Tensor:
        return value.detach()

    def _embed_leaf(self, value: torch.Tensor, hook) -> torch.Tensor:
        self.embed = value.detach().requires_grad_(True)
        return self.embed

    def _output_leaf(self, layer: int):
        def hook_fn(value: torch.Tensor, hook) -> torch.Tensor:
            leaf = self.mlp_out[layer].expand_as(value).clone()
            self.outputs[layer] = leaf.requires_grad_(True)
            if layer not in self.skips:
                return leaf
            name, W_skip = self.skips[layer]
            skip = self.inputs[name] @ W_skip  # the input hook fired earlier in this block
            return leaf + (skip - skip.detach())

        return hook_fn

    def _capture(self, name: str):
        def hook_fn(value: torch.Tensor, hook) -> None:
            self.inputs[name] = value

        return hook_fn


class GraphTooLarge(ValueError):
    """An attribution graph whose edge rows would not fit in ``max_edge_bytes`` (raised before
    any work; a dense transcoder has many active features per position)."""


def _check_graph_size(n_f: int, n_logits: int, n_nodes: int, itemsize: int, limit: int) -> None:
    size = (n_f + n_logits) * n_nodes * itemsize
    if size > limit:
        raise GraphTooLarge(f"the attribution graph needs {size / 2**30:.2f} GiB for its "
                            f"{n_f + n_logits} x {n_nodes} edge rows ({n_f} active features), "
                            f"above max_edge_bytes = {limit / 2**30:.2f} GiB: use shorter prompts "
                            f"or raise the limit")


def attribute(
    lm,
    clt,
    tokens: torch.Tensor,
    layers: Sequence[int],
    input_hook: str = "hook_mlp_in",
    output_hook: str = "hook_mlp_out",
    batch_size: int = DEFAULT_BATCH,
    max_n_logits: int = MAX_N_LOGITS,
    desired_logit_prob: float = DESIRED_LOGIT_PROB,
    max_edge_bytes: int | None = None,
) -> AttributionGraph:
    """Attribution graph of ``clt`` spliced into ``lm`` on one prompt ``tokens [T]``.

    Position 0 is the BOS position (see the module docstring for every definition). ``layers``
    are the LM blocks the transcoder was trained on, increasing (its layer ``i`` is block
    ``layers[i]``); ``clt`` is a :class:`clt.model.CrossLayerTranscoder` whose features write
    ``hook_mlp_out``. ``batch_size`` target nodes share one backward pass. A graph whose edge
    rows would take more than ``max_edge_bytes`` (default ``MAX_EDGE_BYTES``, read at call time)
    raises :class:`GraphTooLarge` before any backward pass.
    """
    # deferred: clt.data.lm imports transformer_lens (seconds); train.py imports this module
    # (through clt.evaluate)
    from .data.lm import FORWARD_LOCK, layer_hook_names

    if not getattr(clt, "writes_features", False):
        raise TypeError(f"attribution needs a transcoder with feature decoder rows, got "
                        f"{type(clt).__name__}")
    if tokens.ndim != 1 or tokens.shape[0] < 2:
        raise ValueError(f"tokens must be one prompt [T] with T >= 2 (BOS first), got "
                         f"{tuple(tokens.shape)}")
    layers = list(layers)
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"layers must be non-empty and strictly increasing, got {layers}")
    if len(layers) != clt.n_layers:
        raise ValueError(f"the transcoder has {clt.n_layers} layers, got {len(layers)} LM layers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    in_names, out_names = layer_hook_names(list(layers), input_hook, output_hook)
    if out_names != [f"blocks.{layer}.hook_mlp_out" for layer in layers]:
        raise ValueError(f"attribution graphs need features that write hook_mlp_out, got "
                         f"output hook {output_hook!r}")
    missing = sorted({n for n in in_names if n not in lm.hook_dict})
    if missing:
        raise ValueError(f"hooks not found in the model: {missing}")

    n_layers, T, dtype = lm.cfg.n_layers, tokens.shape[0], lm.cfg.dtype
    tokens = tokens.to(lm.cfg.device)
    all_out = [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    wanted = set(in_names) | set(all_out)
    was_training = clt.training
    clt.eval()  # inference behaviour (BatchTopK: its EMA threshold)
    try:
        with FORWARD_LOCK, torch.no_grad():
            logits, cache = lm.run_with_cache(tokens[None], names_filter=lambda n: n in wanted,
                                              attention_mask=torch.ones_like(tokens[None]))
        x = torch.stack([cache[n][0, 1:] for n in in_names])  # [L, T-1, d_in]
        found, recon = _active_features(clt, x, layers, dtype)
    finally:
        clt.train(was_training)
    # error nodes [n_layers, T, d_model]: zero at BOS, the whole output where no layer is trained
    clean_out = torch.stack([cache[n][0] for n in all_out])
    errors = clean_out.clone()
    errors[:, 0] = 0
    for i, layer in enumerate(layers):
        errors[layer, 1:] -= recon[i]
    logit_ids, logit_probs, logit_vecs = select_logits(logits[0, -1], lm.W_U, max_n_logits,
                                                       desired_logit_prob)
    n_f, n_logits = found.nodes.shape[0], logit_ids.shape[0]
    n_nodes = n_f + (n_layers + 1) * T + n_logits
    limit = MAX_EDGE_BYTES if max_edge_bytes is None else max_edge_bytes
    _check_graph_size(n_f, n_logits, n_nodes, torch.finfo(dtype).bits // 8, limit)
    edges = torch.zeros(n_f + n_logits, n_nodes, dtype=dtype)

    lin = _Linearized(lm, in_names, layers, clean_out, _raw_skip(clt, dtype, tokens.device))

    def rows(read: torch.Tensor, depth: int) -> torch.Tensor:
        """Edge rows of the targets whose reads sum to ``read``; sources below ``depth``."""
        return _edge_rows(read, lin, depth, errors, found, layers, n_f, n_nodes)

    with FORWARD_LOCK:
        # features read at most the last trained layer: the forward stops there
        if n_f:
            lin.run(tokens, min(batch_size, n_f), layers[-1] + 1)
        for start in range(0, n_f, batch_size):
            target = torch.arange(start, min(start + batch_size, n_f), device=tokens.device)
            src, pos = found.source[target], found.positions[target]
            b = torch.arange(len(target), device=tokens.device)
            read = 0
            for s in src.unique().tolist():
                m = src == s
                x_in = lin.inputs[in_names[s]]  # [copies, T, d_in]
                read = read + (x_in[b[m], pos[m]] * found.encoders[target[m]]).sum()
            edges[start : start + len(target)] = rows(read, layers[int(src.max())])[: len(target)]
        # logits read the last position after ln_final: all blocks
        final = lin.run(tokens, min(batch_size, n_logits), n_layers)  # [copies, T, d_model]
        for start in range(0, n_logits, batch_size):
            vecs = logit_vecs[start : start + batch_size].to(dtype)
            read = (final[: vecs.shape[0], -1] * vecs).sum()
            edges[n_f + start : n_f + start + vecs.shape[0]] = rows(read, n_layers)[: len(vecs)]
    return AttributionGraph(tokens.cpu(), found.nodes, found.activations, logit_ids.cpu(),
                            logit_probs.cpu(), edges, n_layers)


def _edge_rows(
    read: torch.Tensor,
    lin: _Linearized,
    depth: int,
    errors: torch.Tensor,
    found: _Features,
    layers: list[int],
    n_f: int,
    n_nodes: int,
) -> torch.Tensor:
    """One backward pass: ``[B, n_nodes]`` rows, row ``b`` the direct effects on batch row b's
    target of every source in LM layers ``< depth`` and of every token."""
    leaves = [lin.embed, *lin.outputs[:depth]]
    grads = torch.autograd.grad(read, leaves, retain_graph=True, allow_unused=True)
    g_embed, g_out = grads[0], grads[1:]
    B, T, _ = g_embed.shape
    out = torch.zeros(B, n_nodes, dtype=errors.dtype, device=errors.device)
    tok = n_f + errors.shape[0] * T
    out[:, tok : tok + T] = (g_embed * lin.embed.detach()).sum(-1)
    for layer, g in enumerate(g_out):
        if g is not None:
            out[:, n_f + layer * T : n_f + (layer + 1) * T] = (g * errors[layer]).sum(-1)
    L, N, K = found.column.shape
    for s in range(L):
        # [N, B, K] edges of source s's slots: sum over its target layers t of
        # <grad at (t, position), a * W_dec[f, t - s]>, one bmm per target layer
        acc = None
        for r in range(found.decoders[s].shape[2]):
            layer = layers[s + r]
            if layer >= depth or g_out[layer] is None:
                continue
            g = g_out[layer][:, 1:].transpose(0, 1)  # [N, B, d]
            part = torch.bmm(g, found.decoders[s][:, :, r].transpose(1, 2))  # [N, B, K]
            acc = part if acc is None else acc + part
        if acc is None:
            continue
        cols = found.column[s]  # [N, K]
        mask = cols >= 0
        out[:, cols[mask]] = acc.transpose(0, 1)[:, mask]
    return out


# ---- scores over prompts -------------------------------------------------------------------


def attribution_scores(
    lm,
    clt,
    prompts: torch.Tensor,
    layers: Sequence[int],
    input_hook: str = "hook_mlp_in",
    output_hook: str = "hook_mlp_out",
    batch_size: int = DEFAULT_BATCH,
    max_edge_bytes: int | None = None,
) -> dict[str, float]:
    """Mean replacement and completeness scores over the graphs of ``prompts [P, T]`` (BOS at
    position 0 of each). Returns ``replacement_score``, ``completeness_score``, their standard
    errors over prompts ``replacement_score_se``, ``completeness_score_se`` (sample standard
    deviation / sqrt(P); only for P >= 2) and ``graph_prompts``. Raises
    :class:`GraphTooLarge` (from :func:`attribute`) if any prompt's graph does not fit.
    """
    if prompts.ndim != 2 or prompts.shape[0] < 1:
        raise ValueError(f"prompts must be [P, T] with P >= 1, got {tuple(prompts.shape)}")
    scores = torch.tensor([
        graph_scores(attribute(lm, clt, p, layers, input_hook, output_hook, batch_size,
                               max_edge_bytes=max_edge_bytes))
        for p in prompts], dtype=torch.float64)  # [P, 2]
    P = scores.shape[0]
    mean = scores.mean(dim=0)
    out = {"replacement_score": float(mean[0]), "completeness_score": float(mean[1])}
    if P > 1:
        se = scores.std(dim=0) / math.sqrt(P)
        out.update(replacement_score_se=float(se[0]), completeness_score_se=float(se[1]))
    out["graph_prompts"] = P
    return out
