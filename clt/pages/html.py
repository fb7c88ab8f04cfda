"""The pages themselves: self-contained HTML with inline CSS and JavaScript, no network.

- :func:`graph_page`: the attribution graph, its circuit-tracer JSON inline. SVG, one element
  per node (``.node``) and per edge (``.edge``): nodes by layer (rows, token embeddings at the
  bottom, logits on top) and prompt position (columns, each as wide as its fullest cell), edge
  width ``~ sqrt(|w| / max |w|)``, blue for positive and red for negative weights; wheel to zoom,
  drag to pan, hover for values, click for the strongest inputs and outputs.
- :func:`feature_index_page` / :func:`feature_page`: the feature index (sortable, filterable,
  paged) and the feature viewer (``feature.html?layer=L&feature=F``); their data arrive as
  ``<script>`` files calling ``registerIndex`` / ``registerFeatures``, which browsers load from
  ``file://`` where ``fetch`` would be refused.
"""

from __future__ import annotations

import html
import json
from typing import Any

CSS = r"""
* { box-sizing: border-box; }
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1f2328; background: #fff; }
header { padding: 10px 16px; border-bottom: 1px solid #d0d7de; background: #f6f8fa; }
header h1 { font-size: 16px; margin: 0 0 4px 0; }
header .sub { color: #57606a; }
a { color: #0969da; text-decoration: none; }
a:hover { text-decoration: underline; }
.muted { color: #57606a; }
.tok { white-space: pre; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
       padding: 0 1px; border-radius: 2px; }
table { border-collapse: collapse; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eaeef2; text-align: right; }
th { cursor: pointer; user-select: none; background: #f6f8fa; position: sticky; top: 0; }
th.sorted-asc::after { content: " \25B2"; } th.sorted-desc::after { content: " \25BC"; }
td.text, th.text { text-align: left; }
input, select, button { font: inherit; }
.chip { display: inline-block; margin: 2px 4px 2px 0; padding: 1px 6px; border-radius: 10px;
        background: #eef2f6; font-family: ui-monospace, Menlo, monospace; white-space: pre; }
"""

GRAPH_CSS = r"""
body { height: 100vh; display: flex; flex-direction: column; overflow: hidden; }
#main { flex: 1; display: flex; min-height: 0; }
#canvas { flex: 1; position: relative; min-width: 0; }
#graph { width: 100%; height: 100%; display: block; cursor: grab; background: #fff; }
#panel { width: 340px; border-left: 1px solid #d0d7de; overflow-y: auto; padding: 10px 14px; }
#panel h2 { font-size: 14px; margin: 4px 0 6px 0; }
#panel h3 { font-size: 12px; margin: 12px 0 4px 0; text-transform: uppercase; color: #57606a; }
#panel ol { margin: 0; padding-left: 22px; }
#panel li { cursor: pointer; padding: 1px 0; }
#panel li:hover { background: #f3f4f6; }
.edge { fill: none; stroke-linecap: round; }
.edge.pos { stroke: #2563eb; } .edge.neg { stroke: #dc2626; }
svg.focus .edge { opacity: .15; } svg.focus .edge.hl { opacity: 1; stroke-opacity: .9; }
svg.focus .node { opacity: .25; } svg.focus .node.hl, svg.focus .node.sel { opacity: 1; }
.node { cursor: pointer; stroke: #fff; stroke-width: 1; }
.node.feature { fill: #8b5cf6; } .node.error { fill: #9ca3af; }
.node.embedding { fill: #10b981; } .node.logit { fill: #f59e0b; }
.node.sel { stroke: #111827; stroke-width: 2.5; }
.label { font: 13px ui-monospace, Menlo, monospace; fill: #1f2328; pointer-events: none; }
.rowlabel { font: 9px system-ui, sans-serif; fill: #6e7781; }
.gridline { stroke: #f0f2f4; }
#tip { position: absolute; pointer-events: none; background: rgba(17,24,39,.92); color: #fff;
       padding: 5px 8px; border-radius: 4px; font-size: 12px; display: none; max-width: 320px;
       white-space: pre-line; }
.legend span { margin-right: 12px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 5px;
          vertical-align: -1px; margin-right: 3px; }
.w-pos { color: #2563eb; } .w-neg { color: #dc2626; }
"""

GRAPH_JS = r"""
(function () {
  const DATA = JSON.parse(document.getElementById('graph-data').textContent);
  const FEATURE_BASE = JSON.parse(document.getElementById('feature-base').textContent);
  const meta = DATA.metadata, nodes = DATA.nodes, links = DATA.links;
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.getElementById('graph');
  const tip = document.getElementById('tip');
  const panel = document.getElementById('panel');
  const T = meta.prompt_tokens.length;
  let nLayers = DATA.clt ? DATA.clt.n_layers : 0;
  nodes.forEach(n => { if (n.feature_type !== 'embedding' && n.feature_type !== 'logit')
                         nLayers = Math.max(nLayers, +n.layer + 1); });
  const byId = new Map(nodes.map(n => [n.node_id, n]));
  const inputs = new Map(), outputs = new Map();
  nodes.forEach(n => { inputs.set(n.node_id, []); outputs.set(n.node_id, []); });
  links.forEach(l => { inputs.get(l.target).push(l); outputs.get(l.source).push(l); });

  const isFeature = n => n.feature_type === 'cross layer transcoder';
  const featureOf = n => n.node_id.split('_').slice(0, 2).map(Number);
  const rowOf = n => n.feature_type === 'embedding' ? 0 :
    n.feature_type === 'logit' ? nLayers + 1 : +n.layer + 1;
  const tokenText = p => JSON.stringify(meta.prompt_tokens[p]);
  function label(n) {
    if (isFeature(n)) { const [l, f] = featureOf(n); return `L${l} #${f} @${n.ctx_idx}`; }
    if (n.feature_type === 'mlp reconstruction error') return `error L${n.layer} @${n.ctx_idx}`;
    if (n.feature_type === 'embedding') return `token ${tokenText(n.ctx_idx)} @${n.ctx_idx}`;
    return n.clerp || `logit ${n.feature}`;
  }

  // layout: a cell (layer row, position) wraps its nodes in lines of at most PER_LINE; a
  // column is as wide as its widest line, a row as tall as its fullest cell (rows holding
  // only error nodes stay thin), so 1000+ nodes fit on a screen
  const PER_LINE = 6, SP = 12, LINE = 11, PAD = 14, MINW = 70, TOP = 34, LEFT = 52;
  const LOGITW = 96;
  const cells = new Map();
  nodes.forEach(n => {
    if (n.feature_type === 'logit') return;
    const key = rowOf(n) + '/' + n.ctx_idx;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  });
  const nRows = nLayers + 2;
  const perLine = new Array(T).fill(1), lines = new Array(nRows).fill(1);
  cells.forEach((list, key) => {
    const [row, pos] = key.split('/').map(Number);
    perLine[pos] = Math.max(perLine[pos], Math.min(list.length, PER_LINE));
    lines[row] = Math.max(lines[row], Math.ceil(list.length / PER_LINE));
  });
  const colX = [], colW = [];
  let x = LEFT;
  for (let p = 0; p < T; p++) {
    colX.push(x);
    colW.push(Math.max(MINW, perLine[p] * SP + PAD));
    x += colW[p];
  }
  const logitNodes = nodes.filter(n => n.feature_type === 'logit');
  const width = Math.max(x, LEFT + logitNodes.length * LOGITW) + 16;
  // rows from the top: logits, layers high to low, tokens
  const rowH = lines.map((k, r) => r === 0 ? 44 : r === nRows - 1 ? 34 : 10 + k * LINE);
  const rowTop = new Array(nRows);
  let y = TOP;
  for (let r = nRows - 1; r >= 0; r--) { rowTop[r] = y; y += rowH[r]; }
  const height = y + 8;
  const yOf = r => r === 0 ? rowTop[0] + 8 : rowTop[r] + rowH[r] / 2;
  const at = new Map();
  const order = n => n.feature_type === 'mlp reconstruction error' ? 1e12 : featureOf(n)[1];
  cells.forEach((list, key) => {
    const [row, pos] = key.split('/').map(Number);
    list.sort((a, b) => order(a) - order(b));
    const k = Math.ceil(list.length / PER_LINE);
    list.forEach((n, i) => {
      const line = Math.floor(i / PER_LINE), inLine = Math.min(PER_LINE,
                                                                list.length - line * PER_LINE);
      const x0 = colX[pos] + colW[pos] / 2 - (inLine - 1) * SP / 2;
      at.set(n.node_id, [x0 + (i % PER_LINE) * SP, yOf(row) + (line - (k - 1) / 2) * LINE]);
    });
  });
  logitNodes.forEach((n, j) => at.set(n.node_id, [width - 16 - (j + 0.5) * LOGITW,
                                                  yOf(nRows - 1)]));

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  const view = el('g', {id: 'view'}, svg);
  const grid = el('g', {}, view);
  for (let r = 0; r < nRows; r++) {
    el('line', {class: 'gridline', x1: LEFT - 8, x2: width - 10, y1: yOf(r), y2: yOf(r)}, grid);
    const name = r === 0 ? 'tokens' : r === nRows - 1 ? 'logits' : 'L' + (r - 1);
    el('text', {class: 'rowlabel', x: 6, y: yOf(r) + 3}, grid).textContent = name;
  }
  for (let p = 0; p < T; p++) {
    const t = el('text', {class: 'label', x: colX[p] + colW[p] / 2, y: yOf(0) + 22,
                          'text-anchor': 'middle'}, grid);
    const text = meta.prompt_tokens[p];
    t.textContent = text.length > 10 ? text.slice(0, 9) + '\u2026' : text;
    el('title', {}, t).textContent = text;
  }
  logitNodes.forEach(n => {
    const [lx, ly] = at.get(n.node_id);
    const t = el('text', {class: 'label', x: lx, y: ly - 10, 'text-anchor': 'middle'}, grid);
    const word = (n.clerp.match(/"(.*)"/) || [0, String(n.feature)])[1];
    t.textContent = (word.length > 9 ? word.slice(0, 8) + '\u2026' : word) + ' ' +
      n.token_prob.toFixed(2);
  });

  // width and opacity grow with |weight| / max |weight|: weak edges fade into the background
  const maxW = links.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 1e-12);
  const strength = links.map(l => Math.sqrt(Math.abs(l.weight) / maxW));
  const edgeLayer = el('g', {id: 'edges'}, view);
  const edgeEls = links.map((l, i) => {
    const [x1, y1] = at.get(l.source), [x2, y2] = at.get(l.target);
    const midY = (y1 + y2) / 2;
    return el('path', {class: 'edge ' + (l.weight >= 0 ? 'pos' : 'neg'), 'data-i': i,
                       d: `M${x1},${y1} C${x1},${midY} ${x2},${midY} ${x2},${y2}`,
                       'stroke-width': (0.4 + 3.6 * strength[i]).toFixed(2),
                       'stroke-opacity': (0.05 + 0.55 * strength[i]).toFixed(3)}, edgeLayer);
  });
  const filter = document.getElementById('edge-filter');
  function filterEdges() {
    const cut = Math.sqrt(+filter.value / 100);
    let shown = 0;
    edgeEls.forEach((e, i) => {
      const keep = strength[i] >= cut;
      e.style.display = keep ? '' : 'none';
      shown += keep;
    });
    document.getElementById('n-shown').textContent = shown;
  }
  filter.addEventListener('input', filterEdges);
  const nodeLayer = el('g', {id: 'nodes'}, view);
  const nodeEls = new Map();
  nodes.forEach(n => {
    const [cx, cy] = at.get(n.node_id);
    const kind = {'cross layer transcoder': 'feature', 'mlp reconstruction error': 'error',
                  'embedding': 'embedding', 'logit': 'logit'}[n.feature_type];
    const e = kind === 'feature'
      ? el('circle', {cx, cy, r: 4.2}, nodeLayer)
      : el('rect', {x: cx - 5, y: cy - 5, width: 10, height: 10,
                    rx: kind === 'error' ? 1 : 3}, nodeLayer);
    e.setAttribute('class', 'node ' + kind);
    e.setAttribute('data-id', n.node_id);
    nodeEls.set(n.node_id, e);
  });

  // pan and zoom through the viewBox
  let vb = [0, 0, width, height];
  const setVB = () => svg.setAttribute('viewBox', vb.map(v => v.toFixed(1)).join(' '));
  function fit() {
    const r = svg.getBoundingClientRect();
    const s = Math.max(width / Math.max(r.width, 1), height / Math.max(r.height, 1));
    vb = [0, 0, r.width * s, r.height * s];
    setVB();
  }
  fit();
  window.addEventListener('resize', fit);
  svg.addEventListener('wheel', ev => {
    ev.preventDefault();
    const r = svg.getBoundingClientRect();
    const k = Math.exp(ev.deltaY * 0.0015);
    const mx = vb[0] + (ev.clientX - r.left) / r.width * vb[2];
    const my = vb[1] + (ev.clientY - r.top) / r.height * vb[3];
    vb = [mx - (mx - vb[0]) * k, my - (my - vb[1]) * k, vb[2] * k, vb[3] * k];
    setVB();
  }, {passive: false});
  let drag = null;
  svg.addEventListener('mousedown', ev => { drag = [ev.clientX, ev.clientY, vb[0], vb[1], 0]; });
  window.addEventListener('mousemove', ev => {
    if (!drag) return;
    const r = svg.getBoundingClientRect();
    drag[4] = Math.abs(ev.clientX - drag[0]) + Math.abs(ev.clientY - drag[1]);
    vb[0] = drag[2] - (ev.clientX - drag[0]) / r.width * vb[2];
    vb[1] = drag[3] - (ev.clientY - drag[1]) / r.height * vb[3];
    setVB();
  });
  window.addEventListener('mouseup', () => { setTimeout(() => { drag = null; }, 0); });

  const fmt = v => v === null || v === undefined ? '-' : Math.abs(v) >= 100 || Math.abs(v) < 0.01
    ? v.toExponential(2) : v.toFixed(3);
  function describe(n) {
    const lines = [label(n)];
    if (n.activation !== null && n.activation !== undefined)
      lines.push('activation ' + fmt(n.activation));
    if (n.influence !== null && n.influence !== undefined)
      lines.push('cumulative influence ' + fmt(n.influence));
    if (n.feature_type === 'logit') lines.push('probability ' + fmt(n.token_prob));
    lines.push(`in ${inputs.get(n.node_id).length} / out ${outputs.get(n.node_id).length} edges`);
    return lines.join('\n');
  }
  svg.addEventListener('mouseover', ev => {
    const id = ev.target.getAttribute && ev.target.getAttribute('data-id');
    if (!id) return;
    tip.textContent = describe(byId.get(id));
    tip.style.display = 'block';
  });
  svg.addEventListener('mousemove', ev => {
    const r = svg.parentNode.getBoundingClientRect();
    tip.style.left = (ev.clientX - r.left + 14) + 'px';
    tip.style.top = (ev.clientY - r.top + 10) + 'px';
  });
  svg.addEventListener('mouseout', ev => {
    if (ev.target.getAttribute && ev.target.getAttribute('data-id')) tip.style.display = 'none';
  });

  function featureHref(n) {
    const [l, f] = featureOf(n);
    return FEATURE_BASE + 'feature.html?layer=' + l + '&feature=' + f;
  }
  function connList(title, list, key, id) {
    const sorted = list.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    let h = `<h3>${title} (${list.length})</h3><ol id="${id}">`;
    sorted.slice(0, 12).forEach(l => {
      const other = byId.get(l[key]);
      const cls = l.weight >= 0 ? 'w-pos' : 'w-neg';
      h += `<li data-id="${other.node_id}"><span class="${cls}">${fmt(l.weight)}</span> ` +
        esc(label(other)) + '</li>';
    });
    return h + '</ol>';
  }
  const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;',
                                                      '"': '&quot;'}[c]));
  let selected = null;
  function select(id) {
    svg.querySelectorAll('.hl, .sel').forEach(e => e.classList.remove('hl', 'sel'));
    selected = id;
    if (!id) { svg.classList.remove('focus'); panel.innerHTML = panelHelp; return; }
    const n = byId.get(id);
    svg.classList.add('focus');
    nodeEls.get(id).classList.add('sel');
    links.forEach((l, i) => {
      if (l.source === id || l.target === id) {
        edgeEls[i].classList.add('hl');
        nodeEls.get(l.source === id ? l.target : l.source).classList.add('hl');
      }
    });
    let h = `<h2 id="node-title">${esc(label(n))}</h2><div class="muted">` +
      esc(describe(n)).split('\n').slice(1).join('<br>') + '</div>';
    if (isFeature(n) && FEATURE_BASE !== null)
      h += `<p><a id="feature-link" href="${esc(featureHref(n))}">feature page \u2192</a></p>`;
    h += connList('strongest inputs', inputs.get(id), 'source', 'inputs');
    h += connList('strongest outputs', outputs.get(id), 'target', 'outputs');
    panel.innerHTML = h;
    panel.querySelectorAll('li[data-id]').forEach(li =>
      li.addEventListener('click', () => select(li.getAttribute('data-id'))));
  }
  svg.addEventListener('click', ev => {
    if (drag && drag[4] > 4) return;
    const id = ev.target.getAttribute && ev.target.getAttribute('data-id');
    select(id && id !== selected ? id : null);
  });
  const panelHelp = panel.innerHTML;
  window.selectNode = select;
  document.getElementById('n-nodes').textContent = nodes.length;
  document.getElementById('n-edges').textContent = links.length;
  document.body.setAttribute('data-ready', '1');
})();
"""


def _script_json(value: Any) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</``)."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def graph_page(data: dict[str, Any], feature_base: str | None) -> str:
    """The graph page of circuit-tracer graph JSON ``data``; ``feature_base``: URL of the
    feature pages' folder, ending in ``/`` (None: no links)."""
    meta = data["metadata"]
    info = data.get("clt", {})
    prompt = html.escape(meta["prompt"])
    run = html.escape(str(info.get("run", "")))
    details = (f"run {run}, step {info.get('step', '?')}, {info.get('trained', '?')} -> "
               f"{info.get('nonlinearity', '?')} (as exported); node threshold "
               f"{meta.get('node_threshold')}, edge threshold {info.get('edge_threshold')}; "
               f"{info.get('unpruned_features', '?')} active features before pruning")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Attribution graph: {prompt}</title>
<style>{CSS}{GRAPH_CSS}</style></head>
<body>
<header><h1>Attribution graph: <span class="tok">{prompt}</span></h1>
<div class="sub"><span id="n-nodes">?</span> nodes, <span id="n-edges">?</span> edges
&middot; {details}</div>
<div class="sub legend"><span><i class="swatch" style="background:#8b5cf6"></i>feature</span>
<span><i class="swatch" style="background:#9ca3af"></i>error</span>
<span><i class="swatch" style="background:#10b981"></i>token</span>
<span><i class="swatch" style="background:#f59e0b"></i>logit</span>
<span class="w-pos">&#9473; positive</span><span class="w-neg">&#9473; negative</span>
<span class="muted">wheel: zoom, drag: pan, click: select</span>
<label class="muted">hide edges below <input id="edge-filter" type="range" min="0" max="50"
value="0" step="0.5"> of the largest |weight| (<span id="n-shown">all</span> shown)</label>
</div></header>
<div id="main"><div id="canvas"><svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg>
<div id="tip"></div></div>
<aside id="panel"><p class="muted">Click a node to see its strongest inputs and outputs.
Edge width grows with |weight|; blue edges excite, red ones inhibit.</p></aside></div>
<script type="application/json" id="graph-data">{_script_json(data)}</script>
<script type="application/json" id="feature-base">{_script_json(feature_base)}</script>
<script>{GRAPH_JS}</script>
</body></html>
"""


INDEX_JS = r"""
(function () {
  const COLS = [['layer', 'layer', 'num'], ['feature', 'feature', 'num'],
                ['density', 'density', 'num'], ['max', 'max act', 'num'],
                ['spread', 'crosslayer spread', 'num'], ['top', 'top token', 'text']];
  let rows = [], shown = [], sortKey = 'density', sortDir = -1, page = 0;
  const PER = 100;
  const $ = id => document.getElementById(id);
  window.registerIndex = function (d) {
    rows = d.rows.map(r => ({layer: r[0], feature: r[1], density: r[2], max: r[3],
                             spread: r[4], top: r[5]}));
    const layers = [...new Set(rows.map(r => r.layer))].sort((a, b) => a - b);
    $('f-layer').innerHTML = '<option value="">all</option>' +
      layers.map(l => `<option value="${l}">${l}</option>`).join('');
    $('summary').textContent = `${d.summary.scanned} features of ${d.summary.layers.length} ` +
      `layers x ${d.summary.n_features}, scanned on ${d.summary.tokens} held-out tokens; ` +
      `run ${d.summary.run}, step ${d.summary.step}, ${d.summary.trained} -> ` +
      `${d.summary.nonlinearity} (as exported)`;
  };
  const fmt = (v, k) => k === 'density' ? (100 * v).toPrecision(3) + '%' :
    typeof v === 'number' && k !== 'layer' && k !== 'feature' ? v.toFixed(3) : v;
  const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;',
                                                      '"': '&quot;'}[c]));
  function apply() {
    const layer = $('f-layer').value, dmin = parseFloat($('f-dmin').value) / 100,
      dmax = parseFloat($('f-dmax').value) / 100, smin = parseFloat($('f-smin').value),
      text = $('f-text').value, firing = $('f-firing').checked;
    shown = rows.filter(r => (layer === '' || r.layer === +layer) &&
      (isNaN(dmin) || r.density >= dmin) && (isNaN(dmax) || r.density <= dmax) &&
      (isNaN(smin) || r.spread >= smin) && (!firing || r.density > 0) &&
      (!text || r.top.includes(text)));
    const k = sortKey, s = sortDir;
    shown.sort((a, b) => (a[k] < b[k] ? -s : a[k] > b[k] ? s : 0) ||
                          (a.layer - b.layer) || (a.feature - b.feature));
    page = 0;
    render();
  }
  function render() {
    const n = shown.length, pages = Math.max(1, Math.ceil(n / PER));
    page = Math.min(page, pages - 1);
    const part = shown.slice(page * PER, (page + 1) * PER);
    $('head').innerHTML = COLS.map(([k, name, t]) => `<th data-k="${k}" class="${t === 'text' ?
      'text' : ''} ${k === sortKey ? (sortDir > 0 ? 'sorted-asc' : 'sorted-desc') : ''}">` +
      name + '</th>').join('');
    $('body').innerHTML = part.map(r => '<tr class="feature-row">' + COLS.map(([k, , t]) => {
      const v = esc(fmt(r[k], k));
      const cell = k === 'feature'
        ? `<a class="feature-link" href="feature.html?layer=${r.layer}&feature=${r.feature}">` +
          `${v}</a>` : t === 'text' ? `<span class="tok">${v}</span>` : v;
      return `<td class="${t === 'text' ? 'text' : ''}">${cell}</td>`;
    }).join('') + '</tr>').join('');
    $('pageinfo').textContent = n ? `${page * PER + 1}\u2013${Math.min(n, (page + 1) * PER)} ` +
      `of ${n}` : '0 features';
    document.querySelectorAll('#head th').forEach(th => th.addEventListener('click', () => {
      const k = th.getAttribute('data-k');
      sortDir = k === sortKey ? -sortDir : (k === 'layer' || k === 'feature' ? 1 : -1);
      sortKey = k;
      apply();
    }));
  }
  window.addEventListener('DOMContentLoaded', () => {
    ['f-layer', 'f-dmin', 'f-dmax', 'f-smin', 'f-text', 'f-firing'].forEach(id =>
      $(id).addEventListener('input', apply));
    $('prev').addEventListener('click', () => { page = Math.max(0, page - 1); render(); });
    $('next').addEventListener('click', () => { page += 1; render(); });
    apply();
    document.body.setAttribute('data-ready', '1');
  });
})();
"""


def feature_index_page(summary: dict[str, Any]) -> str:
    """The sortable, filterable index of every scanned feature (data: ``index-data.js``)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Features of {html.escape(summary['run'])}
</title><style>{CSS}
.filters {{ padding: 8px 16px; display: flex; gap: 14px; flex-wrap: wrap;
            align-items: center; }}
.filters input[type=number] {{ width: 80px; }}
#table {{ padding: 0 16px 16px 16px; }}
</style></head>
<body><header><h1>Features</h1><div class="sub" id="summary"></div></header>
<div class="filters">
<label>layer <select id="f-layer"></select></label>
<label>density % &ge; <input id="f-dmin" type="number" step="any"></label>
<label>&le; <input id="f-dmax" type="number" step="any"></label>
<label>spread &ge; <input id="f-smin" type="number" step="0.05" min="0" max="1"></label>
<label>top token contains <input id="f-text" type="text" size="10"></label>
<label><input id="f-firing" type="checkbox"> firing only</label>
<button id="prev">&larr;</button><span id="pageinfo"></span><button id="next">&rarr;</button>
</div>
<div id="table"><table><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table></div>
<script>{INDEX_JS}</script>
<script src="index-data.js"></script>
</body></html>
"""


FEATURE_JS = r"""
(function () {
  const q = new URLSearchParams(location.search);
  const layer = parseInt(q.get('layer'), 10), feature = parseInt(q.get('feature'), 10);
  const BLOCK = JSON.parse(document.getElementById('summary-data').textContent).block;
  const $ = id => document.getElementById(id);
  const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;',
                                                      '"': '&quot;'}[c]));
  const NS = 'http://www.w3.org/2000/svg';
  function fail(msg) {
    $('title').textContent = msg;
    document.body.setAttribute('data-ready', '1');
  }
  function bars(values, labels, w, h, color, caption) {
    const max = Math.max(1e-12, ...values), n = Math.max(values.length, 1);
    const bw = (w - 40) / n;
    let s = `<svg xmlns="${NS}" width="${w}" height="${h + 34}" class="bars">`;
    values.forEach((v, i) => {
      const bh = v / max * h;
      s += `<rect x="${30 + i * bw}" y="${h - bh + 4}" width="${Math.max(bw - 1, 1)}" ` +
        `height="${bh}" fill="${color}"><title>${esc(labels[i])}: ${v}</title></rect>`;
    });
    s += `<line x1="30" x2="${w - 10}" y1="${h + 4}" y2="${h + 4}" stroke="#8c959f"/>`;
    const every = Math.ceil(n / 12);
    labels.forEach((l, i) => { if (i % every === 0) s += `<text x="${30 + (i + .5) * bw}" ` +
      `y="${h + 18}" font-size="10" text-anchor="middle" fill="#57606a">${esc(l)}</text>`; });
    return s + `<text x="30" y="${h + 32}" font-size="10" fill="#57606a">${esc(caption)}` +
      '</text></svg>';
  }
  window.registerFeatures = function (records) {
    const r = records.find(d => d.layer === layer && d.feature === feature);
    if (!r) return fail(`Layer ${layer} feature ${feature}: not scanned`);
    document.title = `L${layer} #${feature}`;
    $('title').textContent = `Layer ${layer} \u00b7 feature ${feature}`;
    $('stats').innerHTML = `density <b id="density">${(100 * r.density).toPrecision(3)}%</b> ` +
      `(${r.count} of ${r.tokens} tokens) \u00b7 max activation <b>${r.max.toFixed(3)}</b> ` +
      `\u00b7 crosslayer spread <b>${r.spread.toFixed(3)}</b>`;
    const edges = r.hist.map((_, i) => (i * r.hist_width).toPrecision(2));
    $('hist').innerHTML = r.hist.length ? bars(r.hist, edges, 420, 110, '#e67e22',
      'activation (nonzero values), bins of ' + r.hist_width.toPrecision(3)) :
      '<p class="muted">never fired on the scanned tokens</p>';
    $('decoder').innerHTML = bars(r.decoder.norms, r.decoder.layers.map(l => 'L' + l), 420, 110,
      '#8b5cf6', 'decoder norm per target layer (raw scale)');
    const chips = list => list.map(([t, v]) => `<span class="chip" title="${v}">` +
      `${esc(t)}</span>`).join('');
    $('logits').innerHTML = '<div><b>top</b> ' + chips(r.top_logits) + '</div><div>' +
      '<b>bottom</b> ' + chips(r.bottom_logits) + '</div>';
    const max = Math.max(r.max, 1e-12);
    $('contexts').innerHTML = r.contexts.length ? r.contexts.map((c, i) => {
      const toks = c.tokens.map((t, j) => {
        const a = c.acts[j], peak = c.start + j === c.pos;
        const bg = a > 0 ? `background: rgba(234, 88, 12, ${(0.12 + 0.88 * a / max).toFixed(3)})`
          : '';
        return `<span class="tok${peak ? ' peak' : ''}" style="${bg}" data-act="${a}" ` +
          `title="${a}">${esc(t)}</span>`;
      }).join('');
      return `<div class="context" data-seq="${c.seq}" data-pos="${c.pos}" ` +
        `data-act="${c.act}"><span class="act">${c.act.toFixed(3)}</span>${toks}</div>`;
    }).join('') : '<p class="muted">no activating context</p>';
    const link = f => `feature.html?layer=${layer}&feature=${f}`;
    $('prev').href = link(Math.max(feature - 1, 0));
    $('next').href = link(feature + 1);
    document.body.setAttribute('data-ready', '1');
  };
  if (isNaN(layer) || isNaN(feature)) {
    fail('give ?layer=L&feature=F');
  } else {
    const s = document.createElement('script');
    s.src = `data/l${layer}/b${Math.floor(feature / BLOCK)}.js`;
    s.onerror = () => fail(`Layer ${layer} feature ${feature}: not scanned`);
    document.body.appendChild(s);
  }
})();
"""


def feature_page(summary: dict[str, Any]) -> str:
    """The viewer of one feature, ``feature.html?layer=L&feature=F``."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Feature</title><style>{CSS}
main {{ padding: 10px 16px; max-width: 1100px; }}
section {{ margin: 14px 0; }}
h2 {{ font-size: 13px; text-transform: uppercase; color: #57606a; margin: 0 0 6px 0; }}
.row {{ display: flex; gap: 30px; flex-wrap: wrap; }}
.context {{ padding: 3px 0; border-bottom: 1px solid #f0f2f4; white-space: nowrap;
            overflow: hidden; }}
.context .act {{ display: inline-block; width: 64px; color: #57606a;
                 font-family: ui-monospace, Menlo, monospace; }}
.context .tok {{ padding: 0; }}
.tok.peak {{ outline: 1.5px solid #9a3412; }}
</style></head>
<body><header><h1 id="title">loading&hellip;</h1><div class="sub">
<a href="index.html">&larr; all features</a> &middot; <a id="prev">previous</a> &middot;
<a id="next">next</a> &middot; <span class="muted">{html.escape(summary['run'])}, step
{summary['step']}, as exported ({html.escape(summary['nonlinearity'])}), scanned on
{summary['tokens']} held-out tokens</span></div></header>
<main><section id="stats"></section>
<div class="row"><section><h2>Activation histogram</h2><div id="hist"></div></section>
<section><h2>Decoder writes (crosslayer)</h2><div id="decoder"></div></section></div>
<section><h2>Output logits (W_dec &middot; W_U)</h2><div id="logits"></div></section>
<section><h2>Top activating contexts</h2><div id="contexts"></div></section></main>
<script type="application/json" id="summary-data">{_script_json(summary)}</script>
<script>{FEATURE_JS}</script>
</body></html>
"""


def run_index_page(run: str, graph: dict[str, Any] | None, summary: dict[str, Any]) -> str:
    """``RUN/pages/index.html``: links to the graph (if any) and the feature index."""
    item = "<li>No attribution graph: the features do not write hook_mlp_out.</li>"
    if graph is not None:
        prompt = html.escape(graph["metadata"]["prompt"])
        item = (f'<li><a id="graph-link" href="graph/index.html">Attribution graph</a> of '
                f'<span class="tok">{prompt}</span>: {len(graph["nodes"])} nodes, '
                f'{len(graph["links"])} edges after pruning</li>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pages of {html.escape(run)}</title>
<style>{CSS} main {{ padding: 12px 16px; }} li {{ margin: 6px 0; }}</style></head>
<body><header><h1>{html.escape(run)}</h1><div class="sub">step {summary['step']}, features
as exported ({html.escape(summary['nonlinearity'])})</div></header><main><ul>
{item}
<li><a id="features-link" href="features/index.html">Feature index</a>: {summary['scanned']}
features scanned on {summary['tokens']} held-out tokens</li></ul></main></body></html>
"""
