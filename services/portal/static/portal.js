// scanwatch patient portal: the progress chart (drawn from its own data table), new results
// without a reload (server-sent events), and the chat panel. Loaded as a file: the pages'
// Content-Security-Policy allows no inline script.
"use strict";

(function () {
  const csrf = () => {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  };

  // --- Progress chart ------------------------------------------------------------------------
  const COLOURS = { preliminary: "#1f5fbf", reviewed: "#0a7a3b", threshold: "#9a4a00" };
  const dateWords = new Intl.DateTimeFormat("en-GB", { day: "numeric", month: "long", year: "numeric" });
  const tickWords = new Intl.DateTimeFormat("en-GB", { day: "numeric", month: "short", year: "numeric" });
  let chart = null;

  function drawChart() {
    const canvas = document.getElementById("progress-chart");
    const table = document.getElementById("progress-data");
    if (chart) { chart.destroy(); chart = null; }
    if (!canvas || !table || typeof window.Chart === "undefined") return;
    const rows = Array.from(table.querySelectorAll("tbody tr"));
    const points = rows.map((row) => ({
      x: Date.parse(row.dataset.when),
      y: Number(row.dataset.score),
      reviewed: row.dataset.reviewed === "true",
      threshold: row.dataset.threshold === "" ? null : Number(row.dataset.threshold),
      date: row.dataset.date,
    })).filter((p) => !Number.isNaN(p.x) && !Number.isNaN(p.y));
    const preliminary = points.filter((p) => !p.reviewed);
    const reviewed = points.filter((p) => p.reviewed);
    const threshold = points.find((p) => p.threshold !== null);
    const xs = points.map((p) => p.x);
    const pad = 14 * 24 * 3600 * 1000;
    const xMin = Math.min(...xs) - pad;
    const xMax = Math.max(...xs) + pad;
    const datasets = [
      {
        label: "Preliminary AI result",
        data: preliminary,
        pointStyle: "circle",
        pointRadius: 7,
        pointHoverRadius: 9,
        backgroundColor: COLOURS.preliminary,
        borderColor: COLOURS.preliminary,
        showLine: false,
      },
      {
        label: "Reviewed by a clinician",
        data: reviewed,
        pointStyle: "rect",
        pointRadius: 8,
        pointHoverRadius: 10,
        backgroundColor: COLOURS.reviewed,
        borderColor: COLOURS.reviewed,
        showLine: false,
      },
    ];
    if (threshold) {
      datasets.push({
        label: "Threshold",
        data: [{ x: xMin, y: threshold.threshold }, { x: xMax, y: threshold.threshold }],
        borderColor: COLOURS.threshold,
        borderDash: [8, 6],
        borderWidth: 2,
        pointRadius: 0,
        showLine: true,
        fill: false,
      });
    }
    chart = new window.Chart(canvas, {
      type: "scatter",
      data: { datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: {
          x: {
            type: "linear",
            min: xMin,
            max: xMax,
            // Ticks on the scans' own dates (thinned out when they would overlap), not on
            // round numbers of milliseconds that fall between them.
            afterBuildTicks: (axis) => { axis.ticks = points.map((p) => ({ value: p.x })); },
            ticks: { autoSkip: true, maxRotation: 0, callback: (value) => tickWords.format(new Date(value)) },
            title: { display: true, text: "Date of scan" },
          },
          y: { min: 0, max: 1, title: { display: true, text: "Anomaly score" } },
        },
        plugins: {
          legend: { display: false }, // the page's own legend (text, under the chart)
          tooltip: {
            callbacks: {
              label: (item) => {
                const p = item.raw;
                if (p.date === undefined) return `Threshold ${item.parsed.y.toFixed(2)}`;
                const status = p.reviewed ? "reviewed by a clinician" : "preliminary AI result";
                return `${dateWords.format(new Date(p.x))}: score ${p.y.toFixed(2)}, ${status}`;
              },
            },
          },
        },
      },
    });
    canvas.dataset.points = String(points.length);
    canvas.dataset.drawn = "true";
    // When the page stood complete, on the page's own clock (bench/portal.py reads it).
    if (window.performance && performance.mark) performance.mark("results-drawn");
  }

  // --- New results without a reload -----------------------------------------------------------
  function announce(text) {
    const live = document.getElementById("live-status");
    if (live) live.textContent = text;
  }

  async function refreshResults() {
    const section = document.getElementById("results-section");
    if (!section) return;
    const answer = await fetch("/results/fragment", { headers: { Accept: "text/html" }, credentials: "same-origin" });
    if (answer.redirected || !answer.ok) {
      window.location.assign("/signin?reason=expired");
      return;
    }
    section.innerHTML = await answer.text();
    drawChart();
    announce("Your results have been updated.");
  }

  function followResults() {
    const section = document.getElementById("results-section");
    if (!section || typeof window.EventSource === "undefined") return;
    const since = section.dataset.since || "";
    const stream = new EventSource("/events" + (since ? "?since=" + encodeURIComponent(since) : ""));
    stream.addEventListener("results", () => { refreshResults(); });
    stream.addEventListener("signin", () => {
      stream.close();
      window.location.assign("/signin?reason=expired");
    });
    window.addEventListener("pagehide", () => stream.close());
  }

  // --- Chat panel ----------------------------------------------------------------------------
  function chatLine(line) {
    const item = document.createElement("li");
    item.className = "chat-line " + (line.speaker === "you" ? "you" : "bot");
    const who = document.createElement("span");
    who.className = "speaker";
    who.textContent = line.speaker === "you" ? "You:" : "Assistant:";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = " " + line.text;
    item.append(who, text);
    if (line.buttons && line.buttons.length) {
      const choices = document.createElement("div");
      choices.className = "chat-buttons";
      for (const choice of line.buttons) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "button secondary";
        button.textContent = choice.title;
        button.addEventListener("click", () => {
          choices.remove();
          send({ payload: choice.payload });
        });
        choices.append(button);
      }
      item.append(choices);
    }
    return item;
  }

  async function send(fields) {
    const log = document.getElementById("chat-log");
    const form = document.getElementById("chat-form");
    const body = new URLSearchParams(fields);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    try {
      const answer = await fetch("/chat", {
        method: "POST",
        headers: { Accept: "application/json", "X-CSRF-Token": csrf() },
        body,
        credentials: "same-origin",
      });
      if (answer.status === 401) {
        window.location.assign("/signin?reason=expired");
        return;
      }
      if (!answer.ok) {
        log.append(chatLine({ speaker: "bot", text: "Your message could not be sent. Please reload the page and try again." }));
        return;
      }
      for (const line of await answer.json()) log.append(chatLine(line));
      const last = log.lastElementChild;
      if (last) last.scrollIntoView({ block: "nearest" });
    } finally {
      button.disabled = false;
      form.removeAttribute("aria-busy");
    }
  }

  function chatPanel() {
    const form = document.getElementById("chat-form");
    if (!form) return;
    const input = document.getElementById("chat-message");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      input.value = "";
      send({ message: text }).then(() => input.focus());
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    drawChart();
    followResults();
    chatPanel();
  });
})();
