"""A trace as a self-contained HTML page: data, styles and script inline, nothing fetched.

The page shows the token strip (hover for id, bytes, prediction), the candidates of each generated
step as bars, the logit-lens grid (layers x positions, coloured by the lens probability of the
token the full model predicts there), and attention heatmaps chosen by layer and head.
"""

from __future__ import annotations

import html
import json

from .tracing import Trace


def trace_data(trace: Trace, tokenizer, title: str) -> dict:
    piece = tokenizer.piece
    return {
        "title": title,
        "promptLength": trace.prompt_length,
        "tokens": [{"id": t.id, "text": t.piece, "bytes": t.bytes} for t in trace.tokens],
        "predictions": [piece(i) for i in trace.predictions],
        "steps": [
            {"chosen": piece(s.chosen), "candidates": [[piece(t), round(p, 4)] for t, p in s.candidates]}
            for s in trace.steps
        ],
        "lens": [
            {
                "top": [piece(top[0][0]) for top in layer.lens_top],
                "topProb": [round(top[0][1], 4) for top in layer.lens_top],
                "finalProb": [round(float(p), 4) for p in layer.lens_final_prob],
                "norm": [round(float(n), 2) for n in layer.residual_norm],
            }
            for layer in trace.layers
        ],
        "attention": [
            [[[round(float(w), 3) for w in row] for row in head] for head in layer.attention] for layer in trace.layers
        ],
    }


def render_html(data: dict) -> str:
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # cannot close the script tag
    return PAGE.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", payload)


def write_report(trace: Trace, tokenizer, path: str, title: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(trace_data(trace, tokenizer, title)))


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>plainllama inspect: __TITLE__</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #1d2330; background: #fbfbfd; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.sub { color: #5b6475; margin: 0 0 12px; } .hint { color: #5b6475; font-size: 12px; }
.strip { display: flex; flex-wrap: wrap; gap: 3px; }
.tok { font-family: ui-monospace, monospace; white-space: pre; padding: 3px 5px; border-radius: 4px; background: #e4e8f2; cursor: default; }
.tok.gen { background: #d6f0dd; } .tok:hover, .tok.active { outline: 2px solid #3d5afe; }
#tip { position: fixed; pointer-events: none; background: #1d2330; color: #fff; padding: 6px 8px; border-radius: 6px; font-size: 12px; display: none; white-space: pre; }
.step { display: grid; grid-template-columns: 140px 1fr; gap: 8px; margin: 6px 0; align-items: start; }
.chosen { font-family: ui-monospace, monospace; white-space: pre; font-weight: 600; }
.bars div { display: flex; align-items: center; gap: 6px; font-size: 12px; }
.bar { height: 12px; background: #3d5afe; border-radius: 2px; min-width: 1px; }
.bar.pick { background: #2e9d57; }
.bars span { font-family: ui-monospace, monospace; white-space: pre; min-width: 110px; }
table.grid { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 11px; }
.grid td, .grid th { border: 1px solid #fff; padding: 2px 4px; white-space: pre; max-width: 80px; overflow: hidden; text-overflow: ellipsis; }
.grid th { background: #eef0f6; font-weight: 500; }
.controls { display: flex; gap: 12px; align-items: center; margin-bottom: 8px; }
canvas { border: 1px solid #dde1ea; background: #fff; }
</style></head><body>
<h1>What the model does with your prompt</h1>
<p class="sub" id="subtitle"></p>
<section id="tokens-section"><h2>Tokens</h2><p class="hint">Prompt tokens in blue, generated in green. Hover for the token id, its bytes and the model's prediction at that position.</p><div class="strip" id="tokens"></div></section>
<section id="steps-section"><h2>Candidates at each generated step</h2><div id="steps"></div></section>
<section id="lens-section"><h2>Logit lens</h2><p class="hint">Each cell: the top next token if the model stopped after that layer. Colour: how likely that layer finds the token the full model predicts (darker is surer).</p><div style="overflow-x:auto"><table class="grid" id="lens"></table></div></section>
<section id="attention-section"><h2>Attention</h2>
<div class="controls"><label>layer <select id="layer"></select></label><label>head <select id="head"></select></label><span class="hint">row: the token attending, column: the token attended to</span></div>
<canvas id="heatmap" width="640" height="640"></canvas></section>
<div id="tip"></div>
<script>
const DATA = __DATA__;
const show = t => JSON.stringify(t).slice(1, -1);
// Whitespace made visible, so a newline or space token is not an empty box.
const vis = t => t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/^ +$/, m => "\u2423".repeat(m.length)) || "\u2205";
document.getElementById("subtitle").textContent = DATA.title + " - " + DATA.tokens.length + " tokens, " + DATA.lens.length + " layers";

const tip = document.getElementById("tip");
const strip = document.getElementById("tokens");
DATA.tokens.forEach((t, i) => {
  const span = document.createElement("span");
  span.className = "tok" + (i >= DATA.promptLength ? " gen" : "");
  span.textContent = vis(t.text);
  span.dataset.index = i;
  span.addEventListener("mousemove", e => {
    tip.style.display = "block"; tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px";
    tip.textContent = "position " + i + "\nid " + t.id + "\nbytes " + t.bytes.map(b => b.toString(16).padStart(2, "0")).join(" ") +
      "\nnext token predicted: " + show(DATA.predictions[i]);
  });
  span.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  strip.appendChild(span);
});

const steps = document.getElementById("steps");
if (!DATA.steps.length) steps.textContent = "(no tokens were generated)";
DATA.steps.forEach(s => {
  const row = document.createElement("div"); row.className = "step";
  const chosen = document.createElement("div"); chosen.className = "chosen"; chosen.textContent = show(s.chosen);
  const bars = document.createElement("div"); bars.className = "bars";
  s.candidates.forEach(([text, p]) => {
    const line = document.createElement("div");
    const label = document.createElement("span"); label.textContent = show(text);
    const bar = document.createElement("div"); bar.className = "bar" + (text === s.chosen ? " pick" : ""); bar.style.width = (p * 300) + "px";
    const value = document.createElement("em"); value.textContent = (p * 100).toFixed(1) + "%";
    line.append(label, bar, value); bars.appendChild(line);
  });
  row.append(chosen, bars); steps.appendChild(row);
});

const lens = document.getElementById("lens");
const head = lens.insertRow(); head.insertCell().outerHTML = "<th>layer</th>";
DATA.tokens.forEach(t => { const th = document.createElement("th"); th.textContent = vis(t.text); head.appendChild(th); });
for (let l = DATA.lens.length - 1; l >= 0; l--) {
  const row = lens.insertRow(); row.className = "lens-row";
  const th = document.createElement("th"); th.textContent = l; row.appendChild(th);
  DATA.lens[l].top.forEach((text, i) => {
    const cell = row.insertCell(); cell.className = "lens-cell";
    const p = DATA.lens[l].finalProb[i];
    cell.style.background = "rgba(61, 90, 254, " + (0.08 + 0.9 * p) + ")";
    if (p > 0.5) cell.style.color = "#fff";
    cell.textContent = vis(text);
    cell.title = "layer " + l + ", position " + i + ": top " + show(text) + " " + (DATA.lens[l].topProb[i] * 100).toFixed(1) +
      "%; final prediction " + show(DATA.predictions[i]) + " " + (p * 100).toFixed(1) + "%; residual norm " + DATA.lens[l].norm[i];
  });
}

const layerSelect = document.getElementById("layer"), headSelect = document.getElementById("head");
DATA.attention.forEach((_, l) => layerSelect.add(new Option(l, l)));
DATA.attention[0].forEach((_, h) => headSelect.add(new Option(h, h)));
function drawAttention() {
  const weights = DATA.attention[layerSelect.value][headSelect.value];
  const canvas = document.getElementById("heatmap"), ctx = canvas.getContext("2d");
  const n = weights.length, margin = 90, cell = Math.max(4, Math.floor((canvas.width - margin) / n));
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "10px monospace"; ctx.fillStyle = "#1d2330";
  for (let i = 0; i < n; i++) {
    ctx.textAlign = "right"; ctx.fillText(show(DATA.tokens[i].text).slice(0, 12), margin - 4, margin + i * cell + cell * 0.7);
    ctx.save(); ctx.translate(margin + i * cell + cell * 0.7, margin - 4); ctx.rotate(-Math.PI / 2); ctx.textAlign = "left";
    ctx.fillText(show(DATA.tokens[i].text).slice(0, 12), 0, 0); ctx.restore();
    for (let j = 0; j < n; j++) {
      ctx.fillStyle = "rgba(61, 90, 254, " + weights[i][j] + ")";
      ctx.fillRect(margin + j * cell, margin + i * cell, cell - 1, cell - 1);
    }
    ctx.fillStyle = "#1d2330";
  }
  canvas.dataset.drawn = layerSelect.value + ":" + headSelect.value;
}
layerSelect.addEventListener("change", drawAttention);
headSelect.addEventListener("change", drawAttention);
layerSelect.value = DATA.attention.length - 1;
drawAttention();
</script></body></html>
"""
