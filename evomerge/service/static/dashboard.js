// The evomerge dashboard: reads /api/v1 with the page's cookie, draws the server-built Plotly figures, and
// updates live from the search's server-sent events.
"use strict";

const evomerge = (() => {
  const FINISHED = new Set(["done", "failed", "cancelled"]);
  const PLOT_CONFIG = {responsive: true, displaylogo: false};

  async function request(url, options = {}) {
    const response = await fetch(url, {credentials: "same-origin", ...options});
    if (response.status === 401) {
      location.href = "/login?next=" + encodeURIComponent(location.pathname);
      throw new Error("not logged in");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || response.statusText);
    return body;
  }
  const api = (path, options) => request("/api/v1" + path, options);

  const esc = (text) => String(text ?? "").replace(/[&<>"']/g,
    (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const num = (v, digits = 4) => (v === null || v === undefined) ? "–" : Number(v).toFixed(digits);
  const when = (iso) => iso ? new Date(iso).toLocaleString() : "–";
  const badge = (status) => `<span class="badge ${esc(status)}">${esc(status)}</span>`;

  function throttle(fn, ms) {
    let last = 0, timer = null;
    return () => {
      const wait = last + ms - Date.now();
      if (wait <= 0) { last = Date.now(); fn(); return; }
      if (!timer) timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
    };
  }

  // ------------------------------------------------------------------------------------------ the list

  function listPage() {
    const body = document.querySelector("#searches tbody");
    async function refresh() {
      try {
        const page = await api("/searches?limit=200");
        if (!page.items.length) {
          body.innerHTML = '<tr><td colspan="8" class="muted">No searches yet.</td></tr>';
        } else {
          body.innerHTML = page.items.map((s) => {
            const pct = s.budget ? Math.min(100, 100 * s.evaluated / s.budget) : 0;
            return `<tr><td class="num"><a href="/searches/${s.id}">${s.id}</a></td>
              <td><a href="/searches/${s.id}">${esc(s.name)}</a></td><td>${badge(s.status)}</td>
              <td>${esc(s.algorithm)}</td>
              <td><span class="bar"><span style="width:${pct}%"></span></span> ${s.evaluated}/${s.budget}</td>
              <td class="num">${s.counts.done || 0}</td><td class="num">${s.counts.failed || 0}</td>
              <td>${when(s.created_at)}</td></tr>`;
          }).join("");
        }
        document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
      } catch (e) {
        document.getElementById("updated").textContent = "cannot reach the server: " + e.message;
      }
    }
    refresh();
    setInterval(refresh, 3000);
  }

  // ---------------------------------------------------------------------------------------- one search

  function searchPage() {
    const root = document.getElementById("summary");
    const id = root.dataset.search;
    const objectives = JSON.parse(document.getElementById("objectives").textContent);
    const state = {filter: "", sort: "index", descending: null, offset: 0, limit: 25, total: 0,
                   front: new Set(), best: null, status: null};
    const recipeUrl = (cid, format) => `/api/v1/searches/${id}/candidates/${cid}/recipe?format=${format}`;

    async function refreshSummary() {
      const s = await api(`/searches/${id}`);
      state.status = s.status;
      const status = document.getElementById("status");
      status.textContent = s.status;
      status.className = "badge " + s.status;
      document.getElementById("stop").textContent = s.stop_reason ? `(${s.stop_reason})` : "";
      const pct = s.budget ? Math.min(100, 100 * s.evaluated / s.budget) : 0;
      document.getElementById("bar").style.width = pct + "%";
      const c = s.counts;
      document.getElementById("progress").textContent =
        `${s.evaluated} of ${s.budget} evaluated · ${c.done || 0} done, ${c.failed || 0} failed, ${c.pending || 0} pending`;
      const error = document.getElementById("error");
      error.hidden = !s.error;
      error.textContent = s.error || "";
      state.front = new Set(s.front.map((p) => p.id));
      state.best = s.best ? s.best.id : null;
      const best = document.getElementById("best");
      const downloads = document.getElementById("best-downloads");
      if (s.best) {
        const parts = objectives.map((o) => `${esc(o.name)} ${num(s.best.values[o.name])}` +
          (s.best.holdout && s.best.holdout[o.name] != null ? ` (holdout ${num(s.best.holdout[o.name])})` : ""));
        best.innerHTML = `candidate ${s.best.id}: ${parts.join(", ")} · score ${num(s.best.score)}` +
          ` · ${s.front.length} on the front`;
        downloads.hidden = false;
        document.getElementById("best-yaml").href = `/api/v1/searches/${id}/best/recipe?format=mergekit`;
        document.getElementById("best-json").href = `/api/v1/searches/${id}/best/recipe?format=json`;
      } else {
        best.textContent = "no successful candidate yet";
        downloads.hidden = true;
      }
      document.getElementById("cancel").disabled = FINISHED.has(s.status) || s.status === "cancelling";
      document.getElementById("resume").disabled = !["cancelled", "failed"].includes(s.status);
    }

    async function refreshFigures() {
      const figures = await request(`/ui/searches/${id}/figures`);
      for (const [key, element] of [["front", "front-plot"], ["progress", "progress-plot"], ["map", "map-plot"]]) {
        const box = document.getElementById(element);
        if (box && figures[key]) Plotly.react(box, figures[key].data, figures[key].layout, PLOT_CONFIG);
      }
    }

    async function refreshTable() {
      const params = new URLSearchParams({limit: state.limit, offset: state.offset, order_by: state.sort});
      if (state.filter) params.set("status", state.filter);
      if (state.descending !== null) params.set("descending", state.descending);
      const page = await api(`/searches/${id}/candidates?${params}`);
      state.total = page.total;
      const body = document.querySelector("#candidates tbody");
      if (!page.items.length) {
        body.innerHTML = `<tr><td colspan="${7 + 2 * objectives.length}" class="muted">No candidates yet.</td></tr>`;
      } else {
        body.innerHTML = page.items.map((c) => {
          const cls = [c.status === "failed" ? "failed" : "", c.id === state.best ? "best" :
                       (state.front.has(c.id) ? "front" : "")].join(" ");
          const cells = objectives.map((o) =>
            `<td class="num">${num(c.values && c.values[o.name])}</td>` +
            `<td class="num holdout">${num(c.holdout && c.holdout[o.name])}</td>`).join("");
          const time = (c.merge_seconds || 0) + (c.score_seconds || 0);
          const recipe = c.has_recipe ? `<a href="${recipeUrl(c.id, "mergekit")}" download>YAML</a> · ` +
                         `<a href="${recipeUrl(c.id, "json")}" download>JSON</a>` : "–";
          const title = c.error ? ` title="${esc(c.error)}"` : (c.reused_from !== null ?
                        ` title="same recipe as candidate ${c.reused_from}"` : "");
          return `<tr class="${cls}"${title}><td class="num">${c.id}</td><td>${badge(c.status)}</td>${cells}
            <td class="num">${num(c.score)}</td><td class="num">${c.stage}</td><td>${esc(c.worker || "–")}</td>
            <td class="num">${c.finished_at ? time.toFixed(3) : "–"}</td><td>${recipe}</td></tr>`;
        }).join("");
      }
      const pages = Math.max(1, Math.ceil(state.total / state.limit));
      document.getElementById("page").textContent =
        `page ${Math.floor(state.offset / state.limit) + 1} of ${pages} (${state.total})`;
      document.getElementById("prev").disabled = state.offset === 0;
      document.getElementById("next").disabled = state.offset + state.limit >= state.total;
      document.querySelectorAll("#candidates th.sortable").forEach((th) =>
        th.classList.toggle("active", th.dataset.sort === state.sort));
    }

    async function refreshAll() {
      try {
        await refreshSummary();
        await Promise.all([refreshFigures(), refreshTable()]);
      } catch (e) {
        console.error(e);
      }
    }
    const refreshSoon = throttle(refreshAll, 1500);

    document.getElementById("filter").addEventListener("change", (e) => {
      state.filter = e.target.value; state.offset = 0; refreshTable();
    });
    document.getElementById("sort").addEventListener("change", (e) => {
      state.sort = e.target.value; state.descending = null; state.offset = 0; refreshTable();
    });
    document.querySelectorAll("#candidates th.sortable").forEach((th) => th.addEventListener("click", () => {
      if (state.sort === th.dataset.sort) {
        const objective = objectives.find((o) => o.name === state.sort);
        const current = state.descending ?? (objective ? objective.direction === "maximize" : false);
        state.descending = !current;
      } else {
        state.sort = th.dataset.sort; state.descending = null;
      }
      document.getElementById("sort").value = state.sort;
      state.offset = 0;
      refreshTable();
    }));
    document.getElementById("prev").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - state.limit); refreshTable();
    });
    document.getElementById("next").addEventListener("click", () => {
      state.offset += state.limit; refreshTable();
    });
    for (const action of ["cancel", "resume"]) {
      document.getElementById(action).addEventListener("click", async () => {
        try { await api(`/searches/${id}/${action}`, {method: "POST"}); } catch (e) { alert(e.message); }
        refreshAll();
        if (action === "resume") listen();
      });
    }

    let source = null;
    function listen() {
      if (source) source.close();
      source = new EventSource(`/api/v1/searches/${id}/events`);
      for (const kind of ["progress", "best", "finished", "started", "stage", "requeued", "reference"]) {
        source.addEventListener(kind, refreshSoon);
      }
      source.addEventListener("end", () => { source.close(); source = null; refreshAll(); });
    }
    refreshAll().then(() => { if (!FINISHED.has(state.status)) listen(); });
    // A slow safety net: if the stream is cut (a proxy, a laptop asleep), the page still catches up.
    setInterval(() => { if (!FINISHED.has(state.status)) refreshSoon(); }, 15000);
  }

  return {listPage, searchPage};
})();
