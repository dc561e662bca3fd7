"""index.html: one self-contained page (inline CSS and JS, no network): a sortable, filterable table
of every job, an ASR-vs-CA scatter per defense and per-attack bars drawn as inline SVG from the
filtered rows, and links to each run's entropy map. Uncaught script errors are shown on the page
(`#errors`), so a broken page is visible, and testable, without a console."""
from __future__ import annotations

import html
import json

COLUMNS = [  # key, header, kind
    ("grid", "grid", "text"), ("dataset", "dataset", "text"), ("preset", "preset", "text"),
    ("attack", "attack", "text"), ("family", "family", "text"), ("defense", "defense", "text"),
    ("clip", "CLIP", "text"), ("seed", "seed", "int"), ("status", "status", "text"),
    ("clean_acc", "CA %", "pct"), ("asr", "ASR %", "pct"), ("ra", "RA %", "pct"), ("der", "DER", "num"),
    ("nd_clean_acc", "CA no def. %", "pct"), ("nd_asr", "ASR no def. %", "pct"),
    ("split_tpr", "split TPR %", "pct"), ("split_fpr", "split FPR %", "pct"), ("split_auroc", "AUROC", "num"),
    ("total_s", "time s", "sec"), ("peak_rss_mb", "peak MB", "sec"), ("git_commit", "commit", "commit"),
    ("maps", "maps", "links"),
]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
.controls{display:flex;flex-wrap:wrap;gap:.6em;align-items:center;margin:.6em 0}
.controls label{font-size:.9em}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ddd;padding:2px 6px;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer;position:sticky;top:0}
th.asc:after{content:" \\25B2"} th.desc:after{content:" \\25BC"}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fde8e8} tr.skipped td,tr.pending td,tr.running td{color:#888}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{border:1px solid #eee;padding:4px}
.chart h3{font-size:12px;margin:0 0 2px 0}
#errors{color:#b00;font-weight:bold}
.note{color:#555;font-size:.9em}
"""

_JS = r"""
(function () {
  const errorBox = document.getElementById('errors');
  window.addEventListener('error', function (e) {
    errorBox.textContent += 'script error: ' + e.message + '\n';
    errorBox.dataset.count = String(Number(errorBox.dataset.count || '0') + 1);
  });
  const rows = JSON.parse(document.getElementById('data').textContent);
  const columns = JSON.parse(document.getElementById('columns').textContent);
  const state = {sortKey: null, dir: 1};
  const SVG = 'http://www.w3.org/2000/svg';

  function fmt(v, kind) {
    if (v === null || v === undefined || v === '') return '';
    if (kind === 'pct') return (100 * v).toFixed(2);
    if (kind === 'num') return Number(v).toFixed(3);
    if (kind === 'sec') return Number(v).toFixed(1);
    if (kind === 'commit') return String(v).slice(0, 10) + (String(v).endsWith('-dirty') ? '*' : '');
    return String(v);
  }
  function distinct(key) {
    return Array.from(new Set(rows.map(r => r[key]).filter(v => v !== null && v !== undefined))).sort();
  }
  const selects = ['grid', 'dataset', 'attack', 'defense', 'status'];
  const controls = document.getElementById('controls');
  selects.forEach(function (key) {
    const label = document.createElement('label');
    label.textContent = key + ' ';
    const sel = document.createElement('select');
    sel.id = 'filter-' + key;
    sel.appendChild(new Option('all', ''));
    distinct(key).forEach(v => sel.appendChild(new Option(String(v), String(v))));
    sel.addEventListener('change', render);
    label.appendChild(sel);
    controls.appendChild(label);
  });
  document.getElementById('search').addEventListener('input', render);

  function filtered() {
    const text = document.getElementById('search').value.trim().toLowerCase();
    return rows.filter(function (r) {
      for (const key of selects) {
        const want = document.getElementById('filter-' + key).value;
        if (want !== '' && String(r[key]) !== want) return false;
      }
      if (!text) return true;
      return columns.some(c => String(r[c[0]] === null ? '' : r[c[0]]).toLowerCase().includes(text));
    });
  }
  function sorted(list) {
    if (!state.sortKey) return list;
    const key = state.sortKey;
    return list.slice().sort(function (a, b) {
      const x = a[key], y = b[key];
      const xn = x === null || x === undefined, yn = y === null || y === undefined;
      if (xn || yn) return xn === yn ? 0 : (xn ? 1 : -1);  // empty cells last either way
      if (typeof x === 'number' && typeof y === 'number') return state.dir * (x - y);
      return state.dir * String(x).localeCompare(String(y));
    });
  }
  function renderHead() {
    const tr = document.querySelector('#results thead tr');
    columns.forEach(function (c) {
      const th = document.createElement('th');
      th.textContent = c[1];
      th.dataset.key = c[0];
      th.addEventListener('click', function () {
        state.dir = state.sortKey === c[0] ? -state.dir : 1;
        state.sortKey = c[0];
        document.querySelectorAll('#results th').forEach(h => h.className = '');
        th.className = state.dir > 0 ? 'asc' : 'desc';
        render();
      });
      tr.appendChild(th);
    });
  }
  function renderTable(list) {
    const body = document.querySelector('#results tbody');
    body.textContent = '';
    sorted(list).forEach(function (r) {
      const tr = document.createElement('tr');
      tr.className = r.status;
      if (r.error) tr.title = r.error;
      columns.forEach(function (c) {
        const td = document.createElement('td');
        if (c[2] === 'links') {
          (r[c[0]] || []).forEach(function (href) {
            const a = document.createElement('a');
            a.href = href;
            a.textContent = href.split('-').slice(1).join('-').replace('.png', '');
            td.appendChild(a);
            td.appendChild(document.createTextNode(' '));
          });
        } else {
          td.textContent = fmt(r[c[0]], c[2]);
          if (c[2] !== 'text') td.className = 'n';
        }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    document.getElementById('count').textContent = list.length + ' of ' + rows.length + ' jobs';
  }
  function el(name, attrs, text) {
    const e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(k => e.setAttribute(k, attrs[k]));
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function mean(values) {
    const v = values.filter(x => x !== null && x !== undefined);
    return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
  }
  function palette(i) { return 'hsl(' + ((i * 47) % 360) + ',65%,45%)'; }
  function attacked(list) {
    return list.filter(r => r.status === 'done' && r.family !== 'no-attack' && r.asr !== null);
  }
  function renderScatter(list) {
    const box = document.getElementById('scatter');
    box.textContent = '';
    const done = attacked(list);
    const attacks = Array.from(new Set(done.map(r => r.attack)));
    const defenses = Array.from(new Set(done.map(r => r.series)));
    const W = 230, H = 190, L = 34, B = 26;
    defenses.forEach(function (d) {
      const div = document.createElement('div');
      div.className = 'chart';
      const h = document.createElement('h3');
      h.textContent = d;
      div.appendChild(h);
      const svg = el('svg', {width: W, height: H, role: 'img'});
      svg.appendChild(el('rect', {x: L, y: 4, width: W - L - 6, height: H - B - 4, fill: 'none', stroke: '#999'}));
      svg.appendChild(el('text', {x: W / 2, y: H - 4, 'font-size': 10, 'text-anchor': 'middle'}, 'CA %'));
      svg.appendChild(el('text', {x: 10, y: H / 2, 'font-size': 10, transform: 'rotate(-90 10 ' + H / 2 + ')',
                                  'text-anchor': 'middle'}, 'ASR %'));
      [0, 50, 100].forEach(function (t) {
        svg.appendChild(el('text', {x: L + (W - L - 6) * t / 100, y: H - B + 12, 'font-size': 9,
                                    'text-anchor': 'middle'}, String(t)));
        svg.appendChild(el('text', {x: L - 3, y: 4 + (H - B - 4) * (1 - t / 100) + 3, 'font-size': 9,
                                    'text-anchor': 'end'}, String(t)));
      });
      attacks.forEach(function (a, i) {
        const group = done.filter(r => r.series === d && r.attack === a);
        const ca = mean(group.map(r => r.clean_acc)), asr = mean(group.map(r => r.asr));
        if (ca === null || asr === null) return;
        const c = el('circle', {cx: L + (W - L - 6) * ca, cy: 4 + (H - B - 4) * (1 - asr), r: 4,
                                fill: palette(i), 'class': 'point'});
        c.appendChild(el('title', {}, a + ': CA ' + (100 * ca).toFixed(1) + '%, ASR ' + (100 * asr).toFixed(1) + '%'));
        svg.appendChild(c);
      });
      div.appendChild(svg);
      box.appendChild(div);
    });
    const legend = document.getElementById('scatter-legend');
    legend.textContent = '';
    attacks.forEach(function (a, i) {
      const span = document.createElement('span');
      span.style.color = palette(i);
      span.textContent = '\u25CF ' + a + '  ';
      legend.appendChild(span);
    });
  }
  function renderBars(list) {
    const box = document.getElementById('bars');
    box.textContent = '';
    const done = list.filter(r => r.status === 'done');
    const attacks = Array.from(new Set(done.map(r => r.attack)));
    const defenses = Array.from(new Set(done.map(r => r.series)));
    attacks.forEach(function (a) {
      const div = document.createElement('div');
      div.className = 'chart';
      const h = document.createElement('h3');
      h.textContent = a + ' (bars: CA light, ASR dark)';
      div.appendChild(h);
      const rowH = 16, L = 150, W = 360;
      const svg = el('svg', {width: W, height: defenses.length * rowH + 8, role: 'img'});
      defenses.forEach(function (d, i) {
        const group = done.filter(r => r.series === d && r.attack === a);
        const ca = mean(group.map(r => r.clean_acc)), asr = mean(group.map(r => r.asr));
        const y = 4 + i * rowH;
        svg.appendChild(el('text', {x: L - 4, y: y + 11, 'font-size': 10, 'text-anchor': 'end'}, d));
        if (ca !== null) {
          const bar = el('rect', {x: L, y: y + 1, width: (W - L - 40) * ca, height: 6, fill: '#9cc3e6', 'class': 'bar'});
          bar.appendChild(el('title', {}, d + ' CA ' + (100 * ca).toFixed(2) + '%'));
          svg.appendChild(bar);
        }
        if (asr !== null) {
          const bar = el('rect', {x: L, y: y + 7, width: (W - L - 40) * asr, height: 6, fill: '#c0392b', 'class': 'bar'});
          bar.appendChild(el('title', {}, d + ' ASR ' + (100 * asr).toFixed(2) + '%'));
          svg.appendChild(bar);
          svg.appendChild(el('text', {x: L + (W - L - 40) * asr + 3, y: y + 13, 'font-size': 9}, (100 * asr).toFixed(1)));
        }
      });
      div.appendChild(svg);
      box.appendChild(div);
    });
  }
  function render() {
    const list = filtered();
    renderTable(list);
    renderScatter(list);
    renderBars(list);
  }
  renderHead();
  render();
  document.body.dataset.ready = 'true';
})();
"""


def _json_script(element_id: str, payload) -> str:
    text = json.dumps(payload, allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _clean(value):
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def render_page(rows: list[dict], title: str) -> str:
    keys = [c[0] for c in COLUMNS] + ["error", "series"]
    data = [{k: _clean(r.get(k)) for k in keys} for r in rows]
    stand_in = any((r.get("clip") or "").startswith("standin:") for r in rows)
    note = ("CLIP names starting with <code>standin:</code> are stand-in CLIPs trained in this project on a public "
            "split the victim never sees, not pretrained CLIP. " if stand_in else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">One row per job of the results database. Metrics: CA, ASR, RA as defined in METRICS.md
(ASR over triggered test images whose true label is not the target), DER against the undefended model of the
same attack and seed; split TPR/FPR against the ground-truth poison mask. {note}Click a header to sort;
<code>*</code> after a commit: uncommitted changes.</p>
<pre id="errors" data-count="0"></pre>
<div class="controls" id="controls"><input id="search" type="search" placeholder="filter rows"
 aria-label="filter rows"> <span id="count"></span></div>
<table id="results"><thead><tr></tr></thead><tbody></tbody></table>
<h2>ASR vs CA, per defense</h2>
<div id="scatter-legend" class="note"></div>
<div class="charts" id="scatter"></div>
<h2>Per attack</h2>
<div class="charts" id="bars"></div>
{_json_script("columns", [list(c) for c in COLUMNS])}
{_json_script("data", data)}
<script>{_JS}</script>
</body>
</html>
"""
