// kit studio's page: five views over the JSON of /api/ (kit/studio/server.py); curves are drawn as inline SVG.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { runs: [], recipe: {}, timer: null, planTimer: null, job: null };

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

// ---------------------------------------------------------------- views

const views = { runs: showRuns, watch: showWatch, plan: showPlan, compare: showCompare, export: showExport };

function route() {
  const [view, run] = (location.hash.slice(1) || "runs").split("/");
  clearInterval(state.timer);
  for (const s of document.querySelectorAll("section")) s.classList.toggle("shown", s.id === `page-${view}`);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.hash === `#${view}`);
  (views[view] || showRuns)(run ? decodeURIComponent(run) : undefined);
}

async function loadRuns() {
  const data = await api("/api/runs");
  state.runs = data.runs;
  $("folder").textContent = data.folder;
  for (const select of document.querySelectorAll(".run-select")) {
    const chosen = select.value;
    select.replaceChildren(...data.runs.map((r) => new Option(`${r.name} (${r.status})`, r.name)));
    if (chosen) select.value = chosen;
  }
  return data.runs;
}

function chooseRun(select, run) {
  if (run) select.value = run;
  if (!select.value && state.runs.length) select.value = state.runs[state.runs.length - 1].name;
  return select.value;
}

async function showRuns() {
  const refresh = async () => {
    const runs = await loadRuns();
    const body = $("runs-table").tBodies[0];
    body.replaceChildren();
    for (const r of runs) {
      const row = body.insertRow();
      row.dataset.run = r.name;
      cell(row, r.name);
      cell(row, r.status, `status status-${r.status}`);
      cell(row, r.model);
      cell(row, r.data);
      cell(row, r.total_steps ? `${r.step} / ${r.total_steps}` : r.step);
      cell(row, r.best_eval_loss === null ? "" : r.best_eval_loss.toFixed(4));
      row.onclick = () => {
        $("manifest-name").textContent = r.name;
        $("manifest").textContent = r.manifest ? JSON.stringify(r.manifest, null, 2) : (r.problem || "no manifest.json yet");
      };
      row.ondblclick = () => { location.hash = `#watch/${encodeURIComponent(r.name)}`; };
    }
    $("runs-problems").textContent = runs.filter((r) => r.problem).map((r) => `${r.name}: ${r.problem}`).join("\n");
  };
  await refresh();
  state.timer = setInterval(refresh, 3000);
}

// ---------------------------------------------------------------- watch: curves and sample answers

function chart(series, width = 420, height = 220) {
  const all = series.flatMap((s) => s.points);
  if (!all.length) return "<p>nothing logged yet</p>";
  const pad = 36;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (width - 2 * pad);
  const sy = (y) => height - pad + (y1 === y0 ? -0.5 : -(y - y0) / (y1 - y0)) * (height - 2 * pad);
  const fmt = (v) => (Math.abs(v) < 0.01 && v !== 0 ? v.toExponential(1) : +v.toPrecision(3));
  const paths = series.filter((s) => s.points.length).map((s) =>
    `<path class="${s.cls}" data-points="${s.points.length}" d="${s.points.map((p, i) =>
      `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ")}"><title>${s.name}</title></path>` +
    (s.points.length === 1 ? `<circle class="${s.cls}" cx="${sx(s.points[0][0])}" cy="${sy(s.points[0][1])}" r="3"/>` : ""));
  return `<svg width="${width}" height="${height}" role="img">
    <line x1="${pad}" y1="${height - pad}" x2="${width - pad}" y2="${height - pad}"/>
    <line x1="${pad}" y1="${pad}" x2="${pad}" y2="${height - pad}"/>
    <text x="2" y="${pad}">${fmt(y1)}</text><text x="2" y="${height - pad}">${fmt(y0)}</text>
    <text x="${pad}" y="${height - 20}">step ${x0}</text><text x="${width - pad - 30}" y="${height - 20}">${x1}</text>
    ${paths.join("")}
    ${series.map((s, i) => `<text class="legend ${s.cls}" x="${pad + 8 + i * 70}" y="14">${s.name}</text>`).join("")}
  </svg>`;
}

function points(rows, key) {
  return rows.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
}

async function showWatch(run) {
  await loadRuns();
  const select = $("watch-run");
  chooseRun(select, run);
  select.onchange = () => { location.hash = `#watch/${encodeURIComponent(select.value)}`; };
  let shown = -1;
  const refresh = async () => {
    if (!select.value) return;
    const data = await api(`/api/run?name=${encodeURIComponent(select.value)}`);
    const s = data.summary;
    $("watch-status").textContent = `${s.status}, step ${s.step}${s.total_steps ? " of " + s.total_steps : ""}`;
    $("watch-problem").textContent = s.problem || "";
    if (data.metrics.length === shown) return;  // nothing new in metrics.jsonl
    shown = data.metrics.length;
    const rows = data.metrics;
    $("loss-chart").innerHTML = chart([{ name: "train", cls: "train", points: points(rows, "loss") },
                                       { name: "eval", cls: "eval", points: points(rows, "eval_loss") }]);
    $("lr-chart").innerHTML = chart([{ name: "lr", cls: "lr", points: points(rows, "learning_rate") }]);
    $("tps-chart").innerHTML = chart([{ name: "tokens/s", cls: "tps",
                                        points: points(rows, "train_tokens_per_second") }]);
    const body = $("samples").tBodies[0];
    body.replaceChildren();
    for (const r of rows.filter((r) => r.samples)) {
      for (const sample of r.samples) {
        const row = body.insertRow();
        cell(row, r.step);
        cell(row, sample.question);
        cell(row, sample.answer);
        cell(row, sample.reference);
      }
    }
  };
  await refresh();
  state.timer = setInterval(refresh, 2000);
}

// ---------------------------------------------------------------- plan: the config form, --plan, start

async function showPlan() {
  if ($("config-form").childElementCount) return;
  const schema = await api("/api/schema");
  state.schema = schema;
  $("recipe").replaceChildren(...schema.recipes.map((r) => new Option(r, r)));
  $("recipe").value = schema.recipes.includes("demo") ? "demo" : schema.recipes[0];
  const form = $("config-form");
  for (const section of schema.sections) {
    const fieldset = document.createElement("fieldset");
    fieldset.innerHTML = `<legend>${section.name}</legend>`;
    for (const f of section.fields) {
      const label = document.createElement("label");
      const input = f.choices ? document.createElement("select") : document.createElement("input");
      if (f.choices) input.append(...f.choices.map((c) => new Option(c, c)));
      input.name = f.key;
      label.append(Object.assign(document.createElement("span"), { textContent: f.key.split(".")[1] }), input,
                   Object.assign(document.createElement("small"), { textContent: `${f.doc} (default: ${f.default})` }));
      fieldset.append(label);
    }
    form.append(fieldset);
  }
  form.oninput = () => schedulePlan();
  form.onchange = () => schedulePlan();
  $("examples").oninput = () => schedulePlan();
  $("recipe").onchange = () => loadRecipe();
  $("start").onclick = start;
  $("yaml-export").onclick = async () => {
    try { $("yaml").value = (await api("/api/yaml", request())).yaml; } catch (e) { $("plan-error").textContent = e.message; }
  };
  $("yaml-import").onclick = async () => {
    try { fill((await api("/api/import", { yaml: $("yaml").value })).values, true); } catch (e) { $("plan-error").textContent = e.message; }
  };
  await loadRecipe();
}

function fill(values, onlyGiven) {
  for (const input of $("config-form").elements) {
    if (!input.name) continue;
    if (input.name in values) input.value = values[input.name];
    else if (!onlyGiven) input.value = "";
  }
  schedulePlan(0);
}

async function loadRecipe() {
  state.recipe = (await api(`/api/recipe?name=${encodeURIComponent($("recipe").value)}`)).values;
  fill(state.recipe, false);
}

function overrides() {
  const out = [];
  for (const input of $("config-form").elements) {
    if (!input.name) continue;
    const changed = input.value !== state.recipe[input.name];
    input.parentElement.classList.toggle("changed", changed);
    if (changed) out.push(`${input.name}=${input.value}`);
  }
  return out;
}

function request() {
  return { recipe: $("recipe").value, overrides: overrides(), examples: $("examples").value };
}

function schedulePlan(delay = 300) {
  clearTimeout(state.planTimer);
  state.planTimer = setTimeout(plan, delay);
}

async function plan() {
  try {
    const p = await api("/api/plan", request());
    $("plan-error").textContent = "";
    $("command").textContent = p.command;
    $("plan-output").textContent = p.plan;
    $("memory").textContent = p.memory || "no GPU estimate: set model.gpu_memory_gib (your card's GiB) to plan for a GPU";
    $("memory").className = p.fits === false ? "error" : "";
    $("start").disabled = false;
  } catch (e) {
    $("plan-error").textContent = e.message;
    $("plan-output").textContent = "";
    $("start").disabled = true;
  }
}

async function start() {
  try {
    const job = await api("/api/start", request());
    $("command").textContent = job.command;
    followJob(job, $("job-state"), $("job-log"), $("job-progress"));
  } catch (e) {
    $("plan-error").textContent = e.message;
  }
}

// a started command until it ends: its log's tail and, for a run, the steps it logged
function followJob(job, stateEl, logEl, progressEl) {
  const poll = async () => {
    job = await api(`/api/job?id=${encodeURIComponent(job.id)}`);
    logEl.textContent = `$ ${job.command}\n${job.log}`;
    if (progressEl) {
      const run = (await loadRuns()).find((r) => r.name === job.run);
      if (run && run.total_steps) { progressEl.max = run.total_steps; progressEl.value = run.step; }
      if (!job.running && job.returncode === 0) progressEl.value = progressEl.max;
    }
    stateEl.textContent = job.running ? `running (${job.seconds} s)`
      : job.returncode === 0 ? `finished in ${job.seconds} s` : `failed (exit ${job.returncode})`;
    stateEl.dataset.state = job.running ? "running" : job.returncode === 0 ? "finished" : "failed";
    if (job.running) setTimeout(poll, 2000); else if (job.kind === "export") showExport(job.run);
  };
  poll();
}

// ---------------------------------------------------------------- compare and export

async function showCompare(run) {
  await loadRuns();
  const select = $("compare-run");
  chooseRun(select, run);
  const scores = async () => {
    const data = await api(`/api/run?name=${encodeURIComponent(select.value)}`);
    $("scores").textContent = data.evaluation ? JSON.stringify(data.evaluation, null, 2)
      : "none recorded (kit compare or kit eval writes them)";
  };
  select.onchange = scores;
  if (select.value) await scores();
  $("ask").onclick = async () => {
    $("compare-state").textContent = "generating (the first question loads the model) ...";
    $("compare-state").dataset.state = "running";
    $("answer-base").textContent = $("answer-fine-tune").textContent = "";
    try {
      const a = await api("/api/compare", { run: select.value, prompt: $("prompt").value });
      $("answer-base").textContent = a.base;
      $("answer-fine-tune").textContent = a.fine_tune;
      $("compare-state").textContent = "done";
    } catch (e) {
      $("compare-state").textContent = e.message;
    }
    $("compare-state").dataset.state = "done";
  };
}

async function showExport(run) {
  await loadRuns();
  const select = $("export-run");
  chooseRun(select, run);
  if (!$("quant").options.length) {
    const schema = state.schema || await api("/api/schema");
    $("quant").replaceChildren(...schema.quants.map((q) => new Option(q, q)));
    $("quant").value = "q8_0";
  }
  const show = async () => {
    const e = (await api(`/api/run?name=${encodeURIComponent(select.value)}`)).exports;
    $("export-result").textContent = [e.merged16 && `merged16: ${e.merged16}`,
      ...e.gguf.map((g) => `gguf: ${g.path}`)].filter(Boolean).join("\n") || "none yet";
    const withModelfile = e.gguf.find((g) => g.modelfile);
    $("modelfile").textContent = withModelfile ? withModelfile.modelfile : "no GGUF export yet";
  };
  select.onchange = show;
  const exportTo = async (to) => {
    try {
      const job = await api("/api/export", { run: select.value, to, quant: $("quant").value });
      followJob(job, $("export-state"), $("export-log"));
    } catch (e) {
      $("export-state").textContent = e.message;
    }
  };
  $("export-merged16").onclick = () => exportTo("merged16");
  $("export-gguf").onclick = () => exportTo("gguf");
  if (select.value) await show();
}

window.addEventListener("hashchange", route);
route();
